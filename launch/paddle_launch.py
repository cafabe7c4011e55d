"""``python -m paddle.distributed.launch`` as run_dist.sh runs it: bound to run_dist.sh, watching its
ranks, and told this node's address instead of guessing it.

- It dies with run_dist.sh (common/lifeline.py), and every rank dies with it: a ``kill -9`` of either
  leaves no rank training on (docs/robustness.md "Processes and ranks").
- It notes when and how each rank ended, and what the others were doing at the first failure
  (common/exits.py), for run_dist.sh to name the cause and decide whether a restart can help.
- Paddle's launcher takes a node's address from resolving its hostname (Node.get_host_ip) and, with
  --ips, makes a node whose resolved address is not in the list rank 0 as well: two rank 0s that wait
  for each other forever. run_dist.sh finds the node's address from its interfaces (launch/hosts.py)
  and sets TSN_NODE_IP; everything else is Paddle's.
"""

import os

from common import exits, lifeline


def _watch_ranks() -> exits.Watcher | None:
    """Start a watcher over the rank processes Paddle's launcher starts (None if this Paddle starts
    them some other way: then run_dist.sh has the ranks' own records only)."""
    try:
        from paddle.distributed.launch.utils import process_context
    except ImportError:
        return None
    started = {}
    original = process_context.ProcessContext._start

    def _start(self):
        original(self)
        rank = (self._env or {}).get("PADDLE_TRAINER_ID")
        if rank is not None and getattr(self, "_proc", None) is not None:
            started[int(rank)] = self._proc

    process_context.ProcessContext._start = _start
    return exits.Watcher(lambda: list(started.items())).start()


def main() -> None:
    lifeline.link()  # dies with run_dist.sh; the ranks check for this process (TSN_PARENT_PID)
    from paddle.distributed.launch.context import node
    from paddle.distributed.launch.main import launch

    address = os.environ.get("TSN_NODE_IP")
    if address:
        node.Node.get_host_ip = lambda self: address
    exit_dir = os.environ.get(exits.EXIT_DIR_ENV)
    watcher = _watch_ranks() if exit_dir else None
    try:
        launch()
    except SystemExit as e:
        if watcher is None or not e.code:
            raise
        # Paddle exits with the status of the first rank in its list that failed, often one it stopped
        # itself (-15, i.e. 241): exit with the cause's (2 for a config error, 137 for a SIGKILLed rank)
        watcher.write(exit_dir)
        watcher = None
        raise SystemExit(exits.exit_status(exit_dir) or e.code) from None
    finally:
        if watcher is not None:
            watcher.write(exit_dir)


if __name__ == "__main__":
    main()
