"""The `caffe-compat` command: parsing the command line, printing results and exit codes."""
