"""Networking: netlink (pyroute2), the tap and tc redirect beside a veth, the
CLI's bridge networks, published ports and kubelet's port-forward."""
