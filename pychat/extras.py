"""The optional parts of pychat and the extra that installs each (pyproject.toml).

A deployment installs what it uses: `pychat` alone is the embedded single node; a missing
extra is reported in one line that names the command to run."""

from __future__ import annotations

# What each extra is for, as its error says it.
EXTRAS = {
    "cassandra": "the Cassandra / ScyllaDB store",
    "cluster": "a node of a cluster (Kafka and Redis)",
    "s3": "media in an S3 bucket",
    "export": "history export, verify and import (Arrow, Parquet)",
}


class MissingExtra(RuntimeError):
    """A feature whose extra is not installed."""

    def __init__(self, extra: str, missing: str | None = None) -> None:
        what = EXTRAS.get(extra, extra)
        module = f" (no module {missing!r})" if missing else ""
        super().__init__(f"{what} needs pychat[{extra}]{module}: pip install 'pychat[{extra}]'")
        self.extra = extra


def missing(extra: str, error: ModuleNotFoundError) -> MissingExtra:
    """The error to raise instead of `error`, met importing a module of `extra`."""
    return MissingExtra(extra, error.name)
