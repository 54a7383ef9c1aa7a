from typing import Any

def walk(ring: Any, off: int, frame_type: type, source: str, linktype: int, no: int,
         skip_outgoing: bool, /) -> tuple[list[Any], int, int, int]: ...
