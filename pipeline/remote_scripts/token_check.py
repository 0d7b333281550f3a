"""Runs ON THE REMOTE under the workspace venv's python, fed on stdin (`python - REPO_ID`).

Reads the HF token from the 0600 file named by $HF_TOKEN_PATH (never argv, never the environment), asks the hub
(HF_ENDPOINT, if set) who the token belongs to and whether it may read the gated model. Prints one
`@@result {json}` line with status: ok | no_token | invalid_token | no_access | unreachable | hub_error.
The token itself is never printed.
"""

import json
import os
import sys

repo_id = sys.argv[1]


def emit(status, detail="", user=""):
    print("@@result " + json.dumps({"status": status, "detail": detail, "user": user, "repo": repo_id}), flush=True)
    sys.exit(0 if status == "ok" else 1)


path = os.environ.get("HF_TOKEN_PATH", "")
token = open(path).read().strip() if path and os.path.isfile(path) else ""
if not token:
    emit("no_token", "no HF token was delivered")

try:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
except ImportError as e:
    emit("hub_error", f"huggingface_hub not importable: {e}")


def classify(e):
    if isinstance(e, GatedRepoError):
        return "no_access", f"the token's account has no access to the gated repo {repo_id}"
    if isinstance(e, RepositoryNotFoundError):
        return "no_access", f"{repo_id} not found, or private and not visible to this token"
    if isinstance(e, HfHubHTTPError):
        code = getattr(getattr(e, "response", None), "status_code", None)
        if code == 401:
            return "invalid_token", "the hub rejected the token (401)"
        if code == 403:
            return "no_access", f"access to {repo_id} denied (403)"
        return "hub_error", f"hub answered HTTP {code}"
    return "unreachable", f"hub unreachable: {type(e).__name__}"


api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
try:
    who = api.whoami(token=token)
except Exception as e:  # noqa: BLE001 - every failure is classified, none printed with the token
    emit(*classify(e))
user = who.get("name", "") if isinstance(who, dict) else ""
try:
    api.auth_check(repo_id, token=token)
except Exception as e:  # noqa: BLE001
    status, detail = classify(e)
    emit(status, detail, user)
emit("ok", f"token of {user!r} can read {repo_id}", user)
