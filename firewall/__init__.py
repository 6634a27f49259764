"""The network lock: default-deny iptables/ip6tables rules applied with python-iptables."""
