"""Credentials out of what the role shows or stores: the user-info of URLs.

A repository URL often carries a token (https://user:TOKEN@host/repo.git, or the token as the
user name). Shared by greeter_git_resolve (its messages) and the role's filter
greeter_redact_url (check mode, the build marker, a failed checkout's message, the history).
"""

from __future__ import annotations

import re

# scheme://user-info@: the user-info runs to the last "@" before the authority ends (a "/", "?",
# "#", a quote or a blank), since git and curl take a password holding a raw "@". Only the
# scheme://user@ form is touched: scp-like "git@host:path" names an SSH user, never a token.
USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s'\"]*@")


def redact_url(text: str) -> str:
    """`text` with the user-info of every URL in it replaced by ***."""
    return USERINFO.sub(r"\g<scheme>***@", text)
