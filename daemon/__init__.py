"""criud.daemon: process lifecycle, sockets, fd passing and worker supervision."""
