"""The Yima presentation player: sans-IO reassembly, flow control, retransmission, sync.

A shell drives :class:`StreamPlayer` (one stream) or :class:`Presentation`
(several streams on one playout clock) with events and performs the actions
they return; see docs/player.md.
"""

from .buffer import Buffered, PlayoutBuffer
from .core import (
    Dropper,
    PlayerConfig,
    StreamPlayer,
)
from .events import (
    Action,
    Deliver,
    PacketArrived,
    Pause,
    ProbeAnswered,
    Resume,
    SendNack,
    SendProbe,
    SetSpeed,
)
from .flow import BandsConfig, PauseResumeConfig, ScheduleMirror, TrimConfig
from .presentation import (
    Presentation,
)
from .retransmit import RetransmitConfig
from .seq import SeqExtender, extend_seq, seq_lt
from .sync import SkewMeter, SyncConfig, SyncController

__all__ = [
    "Action",
    "BandsConfig",
    "Buffered",
    "Deliver",
    "Dropper",
    "PacketArrived",
    "Pause",
    "PauseResumeConfig",
    "PlayerConfig",
    "PlayoutBuffer",
    "Presentation",
    "ProbeAnswered",
    "Resume",
    "RetransmitConfig",
    "ScheduleMirror",
    "SendNack",
    "SendProbe",
    "SeqExtender",
    "SetSpeed",
    "SkewMeter",
    "StreamPlayer",
    "SyncConfig",
    "SyncController",
    "TrimConfig",
    "extend_seq",
    "seq_lt",
]
