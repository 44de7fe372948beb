"""Lifecycle logs as one JSON object per line on stdout.

journald (and any log shipper) keeps stdout lines as they are, so a JSON line per event is
searchable without a parser: ``journalctl -u greeter -o cat | jq 'select(.event=="serving")'``.
Fields: ``ts`` (UTC, ISO 8601), ``level``, ``event``, ``pid``, then the event's own fields,
passed as ``logger.info("serving", extra={"fields": {...}})``.
"""

import datetime
import json
import logging
import sys

LOGGER_NAME = "greeter"


class JsonLineFormatter(logging.Formatter):
    """Render a record as one JSON line; ``record.msg`` is the event name."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "pid": record.process,
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def setup(level: str) -> logging.Logger:
    """Send the ``greeter`` logger to stdout as JSON lines, flushed per line."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonLineFormatter())
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log lifecycle event ``name`` with its fields."""
    logger.log(level, name, extra={"fields": fields})
