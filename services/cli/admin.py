"""`aistack login` and `aistack admin ...`: the admin tasks of the web page, for terminal users.

Talks to the gateway over HTTP (`--url`, env AISTACK_URL, default http://127.0.0.1:8000) with a
token from `aistack login` (stored in ~/.config/aistack/token, mode 0600) or env AISTACK_TOKEN (an
access token or an API key). Every command takes `--json` for scripts.

Exit codes: 0 done; 1 the server said no (a 4xx answer), or a waited-for job failed or was
cancelled; 2 usage error; 3 the gateway is unreachable or answered 5xx.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

OK, REFUSED, USAGE, UNAVAILABLE = 0, 1, 2, 3
DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")

admin_app = typer.Typer(help="Admin tasks through the gateway (needs `aistack login` or AISTACK_TOKEN).",
                        no_args_is_help=True)
models_app = typer.Typer(help="Models and versions.", no_args_is_help=True)
policy_app = typer.Typer(help="Traffic policy of a model: A/B weights, canary, blue/green, rollback.",
                         no_args_is_help=True)
jobs_app = typer.Typer(help="Batch inference jobs.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
users_app = typer.Typer(help="Users.", no_args_is_help=True)
for _name, _sub in (("models", models_app), ("policy", policy_app), ("jobs", jobs_app), ("keys", keys_app),
                    ("users", users_app)):
    admin_app.add_typer(_sub, name=_name)

Url = Annotated[str, typer.Option("--url", envvar="AISTACK_URL", help="The gateway.")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts) instead of tables.")]


# -- credentials --------------------------------------------------------------------------------
def token_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "aistack" / "token"


def _saved() -> dict:
    try:
        return json.loads(token_file().read_text())
    except (OSError, ValueError):
        return {}


def _save(doc: dict) -> Path:
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(".token.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f)
    os.replace(tmp, path)
    return path


def _console(err: bool = False):
    from rich.console import Console

    return Console(stderr=err, highlight=False, soft_wrap=False)


def fail(message: str, code: int) -> typer.Exit:
    _console(err=True).print(f"[bold red]error:[/] {message}", markup=True)
    return typer.Exit(code)


class Client:
    """The gateway, with the caller's credentials; turns answers into exit codes."""

    def __init__(self, url: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        env = os.environ.get("AISTACK_TOKEN")
        self.saved = {} if env else _saved()
        self.token = env or self.saved.get("access_token")
        self.http = httpx.Client(base_url=self.url, timeout=timeout)

    def _headers(self, extra: dict | None) -> dict:
        headers = {"accept": "application/json", **(extra or {})}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        return headers

    def _refresh(self) -> bool:
        refresh = self.saved.get("refresh_token")
        if not refresh:
            return False
        try:
            r = self.http.post("/v1/auth/refresh", json={"refresh_token": refresh})
        except httpx.HTTPError:
            return False
        if r.status_code != 200:
            return False
        doc = r.json()
        self.saved.update(access_token=doc["access_token"], refresh_token=doc["refresh_token"])
        self.token = doc["access_token"]
        _save(self.saved)
        return True

    def send(self, method: str, path: str, *, headers: dict | None = None, stream: bool = False,
             **kw) -> httpx.Response:
        def once():
            request = self.http.build_request(method, path, headers=self._headers(headers), **kw)
            return self.http.send(request, stream=stream)

        try:
            r = once()
            if r.status_code == 401 and self._refresh():
                r = once()
        except httpx.TimeoutException:
            raise fail(f"{self.url} timed out", UNAVAILABLE) from None
        except httpx.HTTPError as exc:
            raise fail(f"cannot reach the gateway at {self.url}: {exc}", UNAVAILABLE) from None
        if r.status_code >= 400:
            if stream:
                r.read()
            raise fail(_message(r), REFUSED if r.status_code < 500 else UNAVAILABLE)
        return r

    def json(self, method: str, path: str, **kw) -> Any:
        r = self.send(method, path, **kw)
        return r.json() if r.content else None


def _message(r: httpx.Response) -> str:
    try:
        err = r.json().get("error")
    except ValueError:
        err = None
    if isinstance(err, dict):
        text = f"{err.get('message') or err.get('code')} (HTTP {r.status_code} {err.get('code', '')})".replace(" )", ")")
        if r.status_code == 401:
            text += "; log in with `aistack login` or set AISTACK_TOKEN"
        return text
    return f"HTTP {r.status_code}: {r.text[:300]}" if r.text else f"HTTP {r.status_code}"


def emit(doc: Any, as_json: bool, render=None) -> None:
    if as_json or render is None:
        typer.echo(json.dumps(doc, indent=2, default=str))
    else:
        render(doc)


def _table(title: str | None, columns: list[str], rows: list[list[Any]]):
    from rich.table import Table

    t = Table(title=title, title_justify="left", header_style="bold")
    for c in columns:
        t.add_column(c)
    for row in rows:
        t.add_row(*["–" if v is None else str(v) for v in row])
    return t


def _print(*renderables) -> None:
    console = _console()
    for r in renderables:
        console.print(r)


def _num(v, unit: str = "", digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}{unit}"


def _pct(v) -> str:
    return "–" if v is None else f"{v * 100:.1f}%"


def _routes(policy: dict | None) -> str:
    if not policy:
        return "–"
    routes = policy.get("routes") or {}
    text = ", ".join(f"v{v}: {w:g}" for v, w in routes.items()) if routes else "newest version"
    if policy.get("shadow"):
        text += f"; shadow v{policy['shadow']['version']} {policy['shadow']['percent']:g}%"
    if policy.get("fallback"):
        text += f"; fallback v{policy['fallback']}"
    return text


# -- login ----------------------------------------------------------------------------------------
def login(
    email: Annotated[str, typer.Option(prompt=True, envvar="AISTACK_EMAIL")],
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, envvar="AISTACK_PASSWORD")],
    url: Url = DEFAULT_URL,
    as_json: Json = False,
) -> None:
    """Log in to the gateway and keep the tokens in ~/.config/aistack/token (mode 0600)."""
    try:
        r = httpx.post(f"{url.rstrip('/')}/v1/auth/token", data={"username": email, "password": password},
                       timeout=30)
    except httpx.HTTPError as exc:
        raise fail(f"cannot reach the gateway at {url}: {exc}", UNAVAILABLE) from None
    if r.status_code != 200:
        raise fail(_message(r), REFUSED if r.status_code < 500 else UNAVAILABLE)
    doc = r.json()
    path = _save({"url": url, "email": email, "access_token": doc["access_token"],
                  "refresh_token": doc["refresh_token"], "scope": doc.get("scope", "")})
    out = {"email": email, "url": url, "scope": doc.get("scope", ""), "expires_in": doc.get("expires_in"),
           "token_file": str(path)}
    emit(out, as_json, lambda d: typer.echo(f"logged in to {d['url']} as {d['email']} (scopes: {d['scope']}); "
                                             f"token in {d['token_file']}"))


def logout(as_json: Json = False) -> None:
    """Revoke the stored session and delete the token file."""
    saved = _saved()
    if saved.get("refresh_token"):
        try:
            httpx.post(f"{saved.get('url', DEFAULT_URL).rstrip('/')}/v1/auth/logout",
                       json={"refresh_token": saved["refresh_token"]}, timeout=10)
        except httpx.HTTPError:
            pass  # the local token goes either way
    token_file().unlink(missing_ok=True)
    emit({"logged_out": True}, as_json, lambda d: typer.echo("logged out"))


def _url(url: str) -> str:
    """--url / AISTACK_URL, else the URL of the last login, else the default."""
    if url != DEFAULT_URL or os.environ.get("AISTACK_URL"):
        return url
    return _saved().get("url", url)


# -- overview ----------------------------------------------------------------------------------------
@admin_app.command()
def overview(url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Services and replicas with health and version, traffic of the last minute, models, running jobs."""
    doc = Client(_url(url)).json("GET", "/admin/overview")

    def render(d):
        s = d["traffic"]["summary"]
        services = _table("Services", ["service", "status", "replicas", "version", "req/s", "p50", "p95", "errors"], [
            [svc["name"], svc["status"],
             f"{sum(r['status'] == 'ready' for r in svc['replicas'])}/{len(svc['replicas'])} ready",
             ", ".join(sorted({r["version"] for r in svc["replicas"] if r.get("version")})) or None,
             _num(svc.get("rps")), _num(svc.get("p50_ms"), " ms", 1), _num(svc.get("p95_ms"), " ms", 1),
             _pct(svc.get("error_rate"))] for svc in d["services"]])
        models = _table("Models", ["model", "versions", "traffic policy", "predictions/s", "cache hits"], [
            [m["name"], " ".join(f"v{v['version']}" + ("" if v["state"] == "READY" else "!") for v in m["versions"]),
             _routes(m.get("policy")), _num(m.get("predictions_per_s")), _pct(m.get("cache_hit_ratio"))]
            for m in d["models"]])
        running = [j for j in d["jobs"] if j["status"] in ("queued", "running")]
        jobs = _table("Running jobs", ["job", "model", "status", "progress"], [
            [j["id"], j["model"], j["status"], _pct(j["progress"]["fraction"])] for j in running])
        _print(f"[bold]Traffic[/] (gateway, last {s.get('window_s', 0):.0f} s): {_num(s['rps'])} req/s, "
               f"p50 {_num(s['p50_ms'], ' ms', 1)}, p95 {_num(s['p95_ms'], ' ms', 1)}, "
               f"errors {_pct(s['error_rate'])}, cache hits {_pct(s['cache_hit_ratio'])}", services, models, jobs)
        for k, v in (d.get("errors") or {}).items():
            _console(err=True).print(f"[yellow]{k}: {v}[/]")

    emit(doc, as_json, render)


# -- models and policies ------------------------------------------------------------------------------
@models_app.command("list")
def models_list(url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Models with their versions, state and traffic policy."""
    models = Client(_url(url)).json("GET", "/admin/overview")["models"]
    emit(models, as_json, lambda ms: _print(_table(None, ["model", "version", "state", "traffic policy"], [
        [m["name"], v["version"], v["state"], _routes(m.get("policy")) if i == 0 else ""]
        for m in ms for i, v in enumerate(m["versions"])])))


def _policy_path(model: str) -> str:
    return f"/admin/models/{model}/policy"


@policy_app.command("show")
def policy_show(model: str, url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """The model's current traffic policy."""
    doc = Client(_url(url)).json("GET", _policy_path(model))
    emit(doc, as_json, lambda d: _print(f"[bold]{model}[/]: {_routes(d['policy'])}",
                                        json.dumps(d["policy"], indent=2)))


@policy_app.command("history")
def policy_history(model: str, url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Every policy the model had, newest first (ids for `rollback --to`)."""
    rows = Client(_url(url)).json("GET", f"{_policy_path(model)}/history")
    emit(rows, as_json, lambda rs: _print(_table(f"{model} policy history", ["id", "when", "by", "reason", "routes"], [
        [r["id"], r["created_at"], r["author"], r["reason"], _routes(r["policy"])] for r in rs])))


def _weights(values: list[str]) -> dict[str, float]:
    routes = {}
    for item in values:
        for part in item.split(","):
            version, sep, weight = part.partition("=")
            try:
                if not sep or not version.strip():
                    raise ValueError
                routes[version.strip()] = float(weight)
            except ValueError:
                raise typer.BadParameter(f"{part!r}: expected VERSION=WEIGHT, e.g. 1=90", param_hint="--route") from None
    return routes


@policy_app.command("set")
def policy_set(
    model: str,
    route: Annotated[list[str] | None, typer.Option("--route", "-r", help="VERSION=WEIGHT (A/B), repeatable or "
                                                                          "comma-separated: -r 1=50,2=50")] = None,
    canary: Annotated[str | None, typer.Option(help="Canary version (with --percent and --stable).")] = None,
    percent: Annotated[float, typer.Option(min=0, max=100, help="Canary share in percent.")] = 5.0,
    stable: Annotated[str | None, typer.Option(help="Stable version of a canary; default: the only "
                                                    "other version routed now.")] = None,
    switch: Annotated[str | None, typer.Option(help="Blue/green: all traffic to this version.")] = None,
    newest: Annotated[bool, typer.Option("--newest", help="No routes: the newest version serves.")] = False,
    reason: Annotated[str, typer.Option(help="Kept in the policy history.")] = "",
    url: Url = DEFAULT_URL,
    as_json: Json = False,
) -> None:
    """Change the traffic split; everything else in the policy (shadow, fallback, cache) stays."""
    chosen = [x for x in (route, canary, switch, newest or None) if x]
    if len(chosen) != 1:
        raise typer.BadParameter("give exactly one of --route, --canary, --switch or --newest")
    client = Client(_url(url))
    policy = client.json("GET", _policy_path(model))["policy"]
    if route:
        routes, what = _weights(route), "weights"
    elif switch:
        routes, what = {switch: 100.0}, f"all traffic to v{switch}"
    elif newest:
        routes, what = {}, "newest version"
    else:
        others = [v for v in (policy.get("routes") or {}) if v != canary]
        base = stable or (others[0] if len(others) == 1 else None)
        if base is None:
            raise typer.BadParameter("say which version is --stable", param_hint="--stable")
        routes, what = {base: 100.0 - percent, canary: percent}, f"canary v{canary} at {percent:g}%"
    record = client.json("PUT", _policy_path(model), json={"policy": {**policy, "routes": routes},
                                                           "reason": reason or what})
    emit(record, as_json, lambda r: typer.echo(f"{model}: {_routes(r['policy'])} (policy #{r['id']})"))


@policy_app.command("rollback")
def policy_rollback(
    model: str,
    to: Annotated[int | None, typer.Option(help="Policy id to restore (see `policy history`); "
                                                "default: the previous one.")] = None,
    url: Url = DEFAULT_URL,
    as_json: Json = False,
) -> None:
    """Restore an earlier policy (as a new history entry)."""
    record = Client(_url(url)).json("POST", f"{_policy_path(model)}/rollback", json={"to": to} if to else {})
    emit(record, as_json, lambda r: typer.echo(f"{model}: {_routes(r['policy'])} (policy #{r['id']})"))


# -- jobs ---------------------------------------------------------------------------------------------
def _job_rows(jobs: list[dict]) -> list[list]:
    return [[j["id"], j["model"], j.get("version"), j["status"], _pct(j["progress"]["fraction"]),
             j["progress"].get("done_rows"), j["progress"].get("total_rows"), j.get("created_at")] for j in jobs]


JOB_COLUMNS = ["job", "model", "version", "status", "progress", "rows done", "rows", "created"]


def _wait(client: Client, job: dict, as_json: bool, poll_s: float = 0.5) -> dict:
    """Poll until the job ends; a rich progress bar on a terminal (stderr), nothing with --json."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    path = f"/v1/jobs/{job['id']}"
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                  TextColumn("{task.fields[rows]}"), TimeElapsedColumn(),
                  console=_console(err=True), disable=as_json, transient=False) as bar:
        task = bar.add_task(f"job {job['id'][:12]} ({job['model']})", total=100, rows="")
        while True:
            p = job["progress"]
            rows = f"{p.get('done_rows') or 0}/{p['total_rows']} rows" if p.get("total_rows") else job["status"]
            bar.update(task, completed=round((p.get("fraction") or 0) * 100), rows=rows)
            if job["status"] in TERMINAL:
                return job
            time.sleep(poll_s)
            job = client.json("GET", path)


def _finish(job: dict, as_json: bool) -> None:
    emit(job, as_json, lambda j: _print(_table(None, JOB_COLUMNS, _job_rows([j]))))
    if job["status"] in ("failed", "cancelled"):
        if job.get("error"):
            _console(err=True).print(f"[red]{json.dumps(job['error'])}[/]")
        raise typer.Exit(REFUSED)


@jobs_app.command("submit")
def jobs_submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True, help="CSV or Parquet.")],
    model: Annotated[str, typer.Option("--model", "-m")],
    version: Annotated[str | None, typer.Option(help="Default: the newest version.")] = None,
    chunk_rows: Annotated[int | None, typer.Option(min=1, help="Rows per chunk task.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Show a progress bar until the job ends; exit 1 "
                                                      "if it fails or is cancelled.")] = False,
    url: Url = DEFAULT_URL,
    as_json: Json = False,
) -> None:
    """Upload a file and start a batch inference job."""
    client = Client(_url(url))
    data = {"model": model, **({"version": version} if version else {}),
            **({"chunk_rows": str(chunk_rows)} if chunk_rows else {})}
    with file.open("rb") as f:
        job = client.json("POST", "/v1/jobs/batch-inference", files={"file": (file.name, f)}, data=data)
    if not wait:
        emit(job, as_json, lambda j: typer.echo(f"job {j['id']} {j['status']}"))
        return
    _finish(_wait(client, job, as_json), as_json)


@jobs_app.command("list")
def jobs_list(limit: Annotated[int, typer.Option(min=1, max=500)] = 20, url: Url = DEFAULT_URL,
              as_json: Json = False) -> None:
    """Recent jobs, newest first."""
    jobs = Client(_url(url)).json("GET", "/v1/jobs", params={"limit": limit})["jobs"]
    emit(jobs, as_json, lambda js: _print(_table(None, JOB_COLUMNS, _job_rows(js))))


@jobs_app.command("status")
def jobs_status(job_id: str, wait: Annotated[bool, typer.Option("--wait")] = False, url: Url = DEFAULT_URL,
                as_json: Json = False) -> None:
    """A job's state and progress (`--wait`: a progress bar until it ends)."""
    client = Client(_url(url))
    job = client.json("GET", f"/v1/jobs/{job_id}")
    if wait:
        _finish(_wait(client, job, as_json), as_json)
    else:
        emit(job, as_json, lambda j: _print(_table(None, JOB_COLUMNS, _job_rows([j]))))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Cancel a queued or running job."""
    job = Client(_url(url)).json("POST", f"/v1/jobs/{job_id}/cancel")
    emit(job, as_json, lambda j: typer.echo(f"job {j['id']} {j['status']}"))


@jobs_app.command("download")
def jobs_download(
    job_id: str,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Default: MODEL-JOB.csv here; "
                                                                      "'-' for stdout.")] = None,
    format: Annotated[str, typer.Option(help="csv or parquet.")] = "csv",
    url: Url = DEFAULT_URL,
    as_json: Json = False,
) -> None:
    """Download a finished job's result."""
    from rich.progress import DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    if format not in ("csv", "parquet"):
        raise typer.BadParameter("csv or parquet", param_hint="--format")
    client = Client(_url(url), timeout=300)
    job = client.json("GET", f"/v1/jobs/{job_id}")
    r = client.send("GET", f"/v1/jobs/{job_id}/result", params={"format": format}, stream=True)
    to_stdout = str(output) == "-"
    target = None if to_stdout else (output or Path(f"{job['model']}-{job_id}.{format}"))
    size = 0
    try:
        out = sys.stdout.buffer if to_stdout else target.open("wb")
        with Progress(TextColumn("download"), DownloadColumn(), TransferSpeedColumn(),
                      console=_console(err=True), disable=as_json or to_stdout) as bar:
            task = bar.add_task("download", total=None)
            for chunk in r.iter_bytes():
                out.write(chunk)
                size += len(chunk)
                bar.update(task, completed=size)
        if not to_stdout:
            out.close()
    finally:
        r.close()
    if not to_stdout:
        emit({"job": job_id, "path": str(target), "bytes": size}, as_json,
             lambda d: typer.echo(f"{d['path']} ({d['bytes']} bytes)"))


# -- API keys and users -----------------------------------------------------------------------------------
def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
        return True
    except ValueError:
        return False


@keys_app.command("create")
def keys_create(
    name: str,
    role: Annotated[str, typer.Option(help="admin, developer, service or viewer.")] = "service",
    scope: Annotated[list[str] | None, typer.Option("--scope", help="Repeatable; default: the role's scopes.")] = None,
    expires_in: Annotated[int | None, typer.Option(min=1, help="Seconds until it expires.")] = None,
    rpm: Annotated[int | None, typer.Option(min=1, help="Own rate limit, requests per minute.")] = None,
    url: Url = DEFAULT_URL,
    as_json: Json = False,
) -> None:
    """Create an API key; the key is printed this once (only its hash is stored)."""
    body = {"name": name, "role": role, "scopes": scope or None, "expires_in_s": expires_in, "rate_limit_rpm": rpm}
    doc = Client(_url(url)).json("POST", "/admin/api-keys", json={k: v for k, v in body.items() if v is not None})
    emit(doc, as_json, lambda d: typer.echo(f"created API key {d['name']} (id {d['id']}, role {d['role']}, "
                                             f"scopes {' '.join(d['scopes'])})\nkey: {d['key']}\n"
                                             "(shown once; store it now)"))


@keys_app.command("list")
def keys_list(all_: Annotated[bool, typer.Option("--all", help="Revoked keys too.")] = False,
              url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """API keys (never the keys themselves: prefix, name, role, scopes, use)."""
    keys = Client(_url(url)).json("GET", "/admin/api-keys")
    keys = keys if all_ else [k for k in keys if not k.get("revoked_at")]
    emit(keys, as_json, lambda ks: _print(_table(None, ["id", "name", "prefix", "role", "scopes", "last used",
                                                        "revoked"], [
        [k["id"], k["name"], k["prefix"], k["role"], " ".join(k["scopes"]), k.get("last_used_at"),
         k.get("revoked_at")] for k in ks])))


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="Key id, or the name of one active key.")],
                url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Revoke an API key (gateways stop accepting it within their key cache TTL)."""
    client = Client(_url(url))
    key_id = key
    if not _is_uuid(key):
        matches = [k for k in client.json("GET", "/admin/api-keys") if k["name"] == key and not k.get("revoked_at")]
        if len(matches) != 1:
            raise fail(f"{len(matches)} active keys are named {key!r}; give the id", REFUSED)
        key_id = matches[0]["id"]
    doc = client.json("DELETE", f"/admin/api-keys/{key_id}")
    emit(doc, as_json, lambda d: typer.echo(f"revoked {d['name']} ({d['id']})"))


@users_app.command("list")
def users_list(url: Url = DEFAULT_URL, as_json: Json = False) -> None:
    """Users."""
    users = Client(_url(url)).json("GET", "/admin/users", params={"limit": 1000})
    emit(users, as_json, lambda us: _print(_table(None, ["id", "email", "role", "disabled", "created"], [
        [u["id"], u["email"], u["role"], u["disabled"], u.get("created_at")] for u in us])))


@users_app.command("create")
def users_create(
    email: str,
    role: Annotated[str, typer.Option(help="admin, developer, service or viewer.")] = "viewer",
    password: Annotated[str | None, typer.Option(envvar="AISTACK_USER_PASSWORD",
                                                 help="Default: a random one, printed once.")] = None,
    url: Url = DEFAULT_URL,
    as_json: Json = False,
) -> None:
    """Create a user."""
    import secrets

    generated = password is None
    password = password or secrets.token_urlsafe(18)
    doc = Client(_url(url)).json("POST", "/admin/users", json={"email": email, "password": password, "role": role})
    if generated:
        doc = {**doc, "password": password}
    emit(doc, as_json, lambda d: typer.echo(f"created {d['email']} (role {d['role']}, id {d['id']})"
                                             + (f"\npassword: {password}\n(shown once; store it now)" if generated else "")))


@users_app.command("disable")
def users_disable(user: Annotated[str, typer.Argument(help="User id or email.")], url: Url = DEFAULT_URL,
                  as_json: Json = False) -> None:
    """Disable a user: no more logins or refreshes."""
    client = Client(_url(url))
    user_id = user
    if not _is_uuid(user):
        matches = [u for u in client.json("GET", "/admin/users", params={"limit": 1000}) if u["email"] == user]
        if not matches:
            raise fail(f"no user {user!r}", REFUSED)
        user_id = matches[0]["id"]
    doc = client.json("POST", f"/admin/users/{user_id}/disable")
    emit(doc, as_json, lambda d: typer.echo(f"disabled {d['email']}"))


def register(app: typer.Typer) -> None:
    """Add `login`, `logout` and the `admin` group to the `aistack` command."""
    app.command("login")(login)
    app.command("logout")(logout)
    app.add_typer(admin_app, name="admin")
