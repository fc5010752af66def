"""Data flows one way: readers -> objectives -> mixing -> datamodule."""
