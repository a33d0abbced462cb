"""Where the project the tests run in lies: its root, found from this file."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
