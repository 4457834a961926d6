"""The shell commands the README and docs show, as a newcomer would paste them: extracted from ```bash blocks (and
inline `python -m ...` commands), continuation lines joined, comments dropped, placeholders filled in."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "SECURITY.md", ROOT / "bicep" / "README.md",
        ROOT / "queries" / "README.md", ROOT / "tools" / "simulator" / "README.md"]
GUID = "7e7e7e7e-1234-4abc-8def-0123456789ab"


@dataclass(frozen=True)
class Command:
    path: Path
    line: int
    text: str  # as shown, continuation lines joined, comment dropped
    inline: bool = False

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}: {self.text}"

    def argv(self) -> list[str]:
        """The words, with placeholders filled in: <...-id> a GUID, <...> a word, $(...) a word, [optional] kept."""
        text = re.sub(r"<[^>]*(?:id|object-id)>", GUID, self.text)
        text = re.sub(r"<[^>]+>", "placeholder", text)
        text = re.sub(r"\"?\$\([^)]*\)\"?", "substituted", text)
        text = re.sub(r"\[(--[^\]]+)\]", r"\1", text)
        return shlex.split(text)

    def python_module(self) -> tuple[str, str, list[str]] | None:
        """(interpreter, module, its arguments) for a `python -m` command."""
        words = self.argv()
        if len(words) >= 3 and words[0].endswith("python") and words[1] == "-m":
            return words[0], words[2], words[3:]
        return None


def _strip_comment(line: str) -> str:
    if line.lstrip().startswith("#"):
        return ""
    return re.sub(r"\s+#\s.*$", "", line).rstrip()


def commands(paths: list[Path] = DOCS) -> list[Command]:
    found: list[Command] = []
    for path in paths:
        if not path.exists():
            continue
        text = path.read_text(encoding="utf-8")
        for block in re.finditer(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
            first = text[: block.start()].count("\n") + 2
            pending, start = "", first
            for offset, raw in enumerate(block.group(1).splitlines()):
                line = _strip_comment(raw)
                if not pending:
                    start = first + offset
                if line.endswith("\\"):
                    pending += line[:-1].strip() + " "
                    continue
                joined = (pending + line.strip()).strip()
                pending = ""
                if joined:
                    found.append(Command(path, start, joined))
        prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
        for span in re.finditer(r"`((?:\.venv/bin/)?python -m [^`]+)`", prose):
            words = span.group(1).split()
            if len(words) > 3:  # a command with arguments, not a mention of a module
                line = prose[: span.start()].count("\n") + 1
                found.append(Command(path, line, " ".join(words), inline=True))
    return found
