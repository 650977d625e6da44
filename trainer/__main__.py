"""``python -m trainer --config FILE [key=value ...]``: the per-rank entry point that torchrun runs
(``torchrun --nproc_per_node=K -m trainer --config ...``) and ``simclr train --nproc K`` starts."""

from launch.cli import main

if __name__ == "__main__":
    main(["train", "--in-process", *__import__("sys").argv[1:]])
