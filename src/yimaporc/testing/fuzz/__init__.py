"""Mutational fuzzing of every front door of real ``twistd`` nodes.

``python -m yimaporc.testing.fuzz --target smtp|pop3|imap|rtsp|admin|cluster-udp|cluster-amp|all
--inputs N --seed S --workers K`` starts nodes on 127.0.107.x (:class:`Lab`), sends
mutated valid transcripts in batches (:class:`DoorFuzzer`) and, after each batch,
checks that the node is alive, serves a real client, keeps RSS and fds bounded,
logs no traceback and keeps its cluster view (:class:`Checker`).  Inputs that
cause tracebacks are saved to a corpus; ``--replay FILE`` sends one again.
See docs/fuzzing.md.  Runtime modules never import this package.
"""

from ._check import Bounds, Checker, CheckResult, Traceback, parse_tracebacks
from ._lab import DOORS, Lab
from ._mutate import mutate, segments
from ._run import DoorFuzzer, DoorReport, Options, load_replay, replay
from ._send import Job

__all__ = [
    "DOORS",
    "Bounds",
    "CheckResult",
    "Checker",
    "DoorFuzzer",
    "DoorReport",
    "Job",
    "Lab",
    "Options",
    "Traceback",
    "load_replay",
    "mutate",
    "parse_tracebacks",
    "replay",
    "segments",
]
