"""The HTTP front: what stands between the network and the protocol handlers."""
