"""The Yima presentation player: sans-IO reassembly, flow control, retransmission, sync."""
