"""The `attnserve` command line: serving and client commands, model commands, benchmarks."""
