"""RTP payload formats shared by the RTSP/SDP layer and the Yima media path."""
