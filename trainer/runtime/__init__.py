"""What a rank stands on: the config files' schema, the device and process group, the run folder's
files, how a rank ends."""
