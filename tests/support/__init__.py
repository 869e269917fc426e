"""What the tests share: demo caches, the CLI in-process and as a process, servers."""
