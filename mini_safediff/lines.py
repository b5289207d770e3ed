"""Line-oriented text files (metadata.jsonl, prompt lists), read the way an editor numbers their lines: split on
"\n" alone (a caption may hold U+2028, NEL or any other Unicode line break; a "\r" before the "\n" is dropped),
a UTF-8 byte-order mark at the start accepted, and a line that is not UTF-8 reported by its number instead of
failing the whole file."""
from pathlib import Path

BOM = b"\xef\xbb\xbf"


class LineError(ValueError):
    """One line that could not be read; `line` is its 1-based number."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


def numbered_lines(path) -> list[tuple[int, str | LineError]]:
    """(line number, text) for every line of the file, or (line number, LineError) where it is not UTF-8."""
    data = Path(path).read_bytes()
    lines = []
    for number, raw in enumerate(data.removeprefix(BOM).split(b"\n"), start=1):
        try:
            lines.append((number, raw.removesuffix(b"\r").decode("utf-8")))
        except UnicodeDecodeError as error:
            lines.append((number, LineError(number, f"not UTF-8 text ({error.reason} at byte {error.start})")))
    if lines and lines[-1][1] == "":  # the newline that ends the last line starts no new one
        lines.pop()
    return lines
