"""The ``monolith-torch`` command: ``serve`` runs the prediction server, every other command the trainer.

    monolith-torch serve --export-dir DIR [--port 8080] ...   (monolith_torch.serve.cli)
    monolith-torch train|eval|predict|data ...                 (monolith_torch.train.cli)

Each side is imported only when used: ``train`` never loads the web stack.
"""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Runs ``monolith-torch`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "serve":
        from monolith_torch.serve.cli import main as serve_main

        return serve_main(argv[1:])
    from monolith_torch.train.cli import main as train_main

    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
