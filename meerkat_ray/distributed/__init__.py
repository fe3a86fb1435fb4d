"""Everything that imports Ray: the cluster (`cluster`), the `executor=ray` executor (`executor`,
`server_proxy`, `actors`) and Ray Tune sweeps (`tune`). The core reaches it only through the
executor registry (`executors.py`) and the CLI's `tune` command."""
