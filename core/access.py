"""Who may do what: the one place that decides whether a visitor gets the lab (every page, and
the right to start, cancel and delete runs) or the viewer mode (the presenter view and, if the
owner allows, read-only Runs/Compare/Overview), and whether the app may be served at all on the
address it was given.

No streamlit import: the app hands in what it read (the environment, the `[lab]` and `[auth]`
tables of .streamlit/secrets.toml, the signed-in user from st.user, server.address) and gets
typed answers back. Pages ask only this module (through app_pages._common.access()).

Settings, environment first, then `[lab]` in .streamlit/secrets.toml:
- FINETUNE_LAB_MODE / lab.mode: "lab" (default) or "viewer" (everyone not signed in, and
  everyone when no identity provider is configured, gets the viewer mode).
- FINETUNE_LAB_VIEWER_PAGES / lab.viewer_pages: which read-only pages a viewer also gets,
  among "overview", "runs", "compare" (comma-separated in the environment); default none.
- FINETUNE_LAB_ALLOW / lab.allow: e-mail addresses and "@domain"s of signed-in users who get
  the lab (comma-separated in the environment). A signed-in user on no list gets the viewer
  mode: with a public provider (Google, Microsoft) anyone can sign in.
- FINETUNE_LAB_PRESENT_RUN / lab.present_run: the run whose best model the presenter view
  shows viewers; default the best model (core.analysis.inference.default_run).
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

MODE_ENV = "FINETUNE_LAB_MODE"
VIEWER_PAGES_ENV = "FINETUNE_LAB_VIEWER_PAGES"
ALLOW_ENV = "FINETUNE_LAB_ALLOW"
PRESENT_RUN_ENV = "FINETUNE_LAB_PRESENT_RUN"
SECRETS_TABLE = "lab"  # the [lab] table of .streamlit/secrets.toml

# Pages a viewer may be given besides the presenter view: they only read the store (their
# controls that change something ask may_change()).
READ_ONLY_PAGES = ("overview", "runs", "compare")
# The largest picture a viewer may upload, in megabytes (the lab's uploader takes zips of
# data sets up to server.maxUploadSize). Read into memory, never written to disk.
VIEWER_UPLOAD_MB = 10


class Mode(enum.Enum):
    LAB = "lab"
    VIEWER = "viewer"


class AccessError(ValueError):
    """A setting that cannot be understood; the message says which and what is allowed."""


@dataclass(frozen=True)
class Settings:
    mode: Mode = Mode.LAB
    viewer_pages: tuple[str, ...] = ()  # among READ_ONLY_PAGES
    allow: tuple[str, ...] = ()  # lower-case e-mails and "@domain"s
    present_run: str | None = None


@dataclass(frozen=True)
class Visitor:
    """Who is looking, as the app's sign-in (st.user) reports it."""

    signed_in: bool = False
    email: str | None = None
    name: str | None = None


ANONYMOUS = Visitor()


@dataclass(frozen=True)
class Access:
    """What one visitor gets."""

    mode: Mode
    pages: tuple[str, ...]  # read-only pages offered in viewer mode (empty in the lab)
    visitor: Visitor
    sign_in_available: bool  # an identity provider is configured: offer "Sign in"
    reason: str  # one plain sentence: why this visitor has this mode
    present_run: str | None = None  # the run the owner named for the presenter view

    @property
    def lab(self) -> bool:
        return self.mode is Mode.LAB

    def may_change(self) -> bool:
        """Whether this visitor may start, cancel, resume, delete, import, export or upload
        weights: only in the lab."""
        return self.mode is Mode.LAB

    def offers(self, page: str) -> bool:
        """Whether a read-only page ("overview", "runs", "compare") is served to this visitor."""
        return self.lab or page in self.pages

    @property
    def started_by(self) -> str | None:
        """What to record as the starter of a run this visitor starts: the e-mail when signed in."""
        return self.visitor.email if self.visitor.signed_in else None


def _split(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    return tuple(s.strip() for s in items if str(s).strip())


def read_settings(env: Mapping[str, str], secrets: Mapping[str, object] | None = None) -> Settings:
    """Settings from the environment, else the `[lab]` table of secrets.toml (`secrets`: that
    table, or None). Raises AccessError for a value that is not allowed."""
    table = secrets or {}

    def pick(env_name: str, key: str):
        return env[env_name] if env.get(env_name) else table.get(key)

    raw_mode = str(pick(MODE_ENV, "mode") or Mode.LAB.value).strip().lower()
    try:
        mode = Mode(raw_mode)
    except ValueError:
        raise AccessError(f"{MODE_ENV} (or [lab] mode) is {raw_mode!r}; use \"lab\" or "
                          f"\"viewer\".") from None
    pages = tuple(p.lower() for p in _split(pick(VIEWER_PAGES_ENV, "viewer_pages")))
    unknown = [p for p in pages if p not in READ_ONLY_PAGES]
    if unknown:
        raise AccessError(f"{VIEWER_PAGES_ENV} (or [lab] viewer_pages) names {', '.join(unknown)}; "
                          f"a viewer may only be given {', '.join(READ_ONLY_PAGES)}.")
    allow = tuple(a.lower() for a in _split(pick(ALLOW_ENV, "allow")))
    bad = [a for a in allow if "@" not in a]
    if bad:
        raise AccessError(f"{ALLOW_ENV} (or [lab] allow) has {', '.join(bad)}: write an e-mail "
                          f"address (ada@example.org) or a domain with its @ (@example.org).")
    present = pick(PRESENT_RUN_ENV, "present_run")
    return Settings(mode, pages, allow, str(present).strip() if present else None)


def sign_in_configured(auth: Mapping[str, object] | None) -> bool:
    """Whether `[auth]` of secrets.toml configures an identity provider st.login can use:
    redirect_uri and cookie_secret, and a client id with the provider's metadata URL, at the
    top level (the default provider) or in a named provider table."""
    if not auth or not auth.get("redirect_uri") or not auth.get("cookie_secret"):
        return False

    def provider(table: Mapping[str, object]) -> bool:
        return bool(table.get("client_id") and table.get("server_metadata_url"))

    return provider(auth) or any(isinstance(v, Mapping) and provider(v) for v in auth.values())


def allowed(email: str | None, allow: Sequence[str]) -> bool:
    """Whether an e-mail is on the allow-list: the address itself or its "@domain"."""
    if not email or "@" not in email:
        return False
    email = email.strip().lower()
    return email in allow or email[email.rindex("@"):] in allow


def decide(settings: Settings, sign_in: bool, visitor: Visitor = ANONYMOUS) -> Access:
    """The mode of one visitor. With an identity provider configured (`sign_in`), a signed-in
    user on the allow-list gets the lab and everyone else the viewer mode; without one, the
    mode setting decides for everyone."""
    def viewer(reason: str) -> Access:
        return Access(Mode.VIEWER, settings.viewer_pages, visitor, sign_in, reason,
                      settings.present_run)

    if sign_in:
        if not visitor.signed_in:
            return viewer("Not signed in: sign in to use the lab.")
        if allowed(visitor.email, settings.allow):
            return Access(Mode.LAB, (), visitor, True, f"Signed in as {visitor.email}.",
                          settings.present_run)
        return viewer(f"Signed in as {visitor.email or 'a user without an e-mail'}, who is not "
                      f"on the lab's allow-list ([lab] allow in .streamlit/secrets.toml).")
    if settings.mode is Mode.VIEWER:
        return viewer("This lab is shown in viewer mode.")
    return Access(Mode.LAB, (), visitor, False, "The lab on this computer.",
                  settings.present_run)


def is_loopback(address: str | None) -> bool:
    """Whether a server address only listens on this machine. Empty means every interface
    (Streamlit's meaning of an unset server.address)."""
    if not address:
        return False
    host = address.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to any interface


def serving_refusal(address: str | None, settings: Settings, sign_in: bool) -> str | None:
    """One line saying why the lab must not be served on `address`, with the fix; None when it
    may: on loopback, with sign-in configured, or in viewer mode."""
    if is_loopback(address) or sign_in or settings.mode is Mode.VIEWER:
        return None
    where = address or "every network interface"
    return (f"Refusing to serve the lab on {where}: anyone who reaches it could start, cancel "
            f"and delete runs. Fix: serve it in viewer mode ({MODE_ENV}=viewer), configure "
            f"sign-in ([auth] in .streamlit/secrets.toml, README \"Presenting, viewer mode and "
            f"sign-in\"), or keep --server.address localhost.")


ADDRESS_ENV = "STREAMLIT_SERVER_ADDRESS"  # Streamlit's own environment form of server.address


def requested_address(argv: Sequence[str], env: Mapping[str, str], configured: str | None) -> str | None:
    """The address `streamlit run ... argv` will listen on: --server.address from the command
    line (either form), else $STREAMLIT_SERVER_ADDRESS, else `configured` (config.toml)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--server.address="):
            return arg.split("=", 1)[1]
        if arg == "--server.address" and i + 1 < len(argv):
            return argv[i + 1]
    return env.get(ADDRESS_ENV, configured)


def read_toml_tables(path) -> dict[str, object]:
    """The tables of a TOML file (.streamlit/secrets.toml, config.toml); {} when it is absent."""
    import tomllib
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        return {}
    with p.open("rb") as f:
        return tomllib.load(f)


def refusal_at_start(root, argv: Sequence[str], env: Mapping[str, str]) -> str | None:
    """serving_refusal for `streamlit run streamlit_app.py argv` started in `root` (the repo),
    reading .streamlit/config.toml and .streamlit/secrets.toml as Streamlit will: for
    scripts/start.sh, which says it in one line and does not start."""
    from pathlib import Path

    folder = Path(root) / ".streamlit"
    server = read_toml_tables(folder / "config.toml").get("server", {})
    configured = server.get("address") if isinstance(server, Mapping) else None
    secrets = read_toml_tables(folder / "secrets.toml")
    lab, auth = secrets.get(SECRETS_TABLE), secrets.get("auth")
    settings = read_settings(env, lab if isinstance(lab, Mapping) else None)
    return serving_refusal(requested_address(argv, env, configured), settings,
                           sign_in_configured(auth if isinstance(auth, Mapping) else None))
