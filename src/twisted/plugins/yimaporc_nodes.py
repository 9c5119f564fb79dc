"""twistd dropins: ``twistd yima-node`` and ``twistd porcupine-node``."""

from twisted.application.service import ServiceMaker

yima_node = ServiceMaker(
    "yima-node",
    "yimaporc.tap.yima",
    "A Yima continuous-media cluster node (RTSP/RTP)",
    "yima-node",
)
porcupine_node = ServiceMaker(
    "porcupine-node",
    "yimaporc.tap.porcupine",
    "A Porcupine cluster mail node (SMTP, POP3, IMAP)",
    "porcupine-node",
)
