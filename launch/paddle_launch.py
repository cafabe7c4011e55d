"""``python -m paddle.distributed.launch`` told this node's address instead of guessing it.

Paddle's launcher takes a node's address from resolving its hostname (Node.get_host_ip) and, with
--ips, makes a node whose resolved address is not in the list rank 0 as well: two rank 0s that wait
for each other forever. run_dist.sh finds the node's address from its interfaces (launch/hosts.py)
and starts the launcher through this module with TSN_NODE_IP set; everything else is Paddle's.
"""

import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from paddle.distributed.launch.context import node
    from paddle.distributed.launch.main import launch

    address = os.environ.get("TSN_NODE_IP")
    if address:
        node.Node.get_host_ip = lambda self: address
    launch()


if __name__ == "__main__":
    main()
