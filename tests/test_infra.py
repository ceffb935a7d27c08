"""Infrastructure files (infra/): Terraform structure and policy rules, Dockerfile rules, and a secrets scan
of cluster/ and infra/. Offline. The checks are plain functions that return a list of problems, so each
negative control feeds a mutated copy and asserts the problem is reported.

No python-hcl2 in the venv, so HCL is read by a small string-aware scanner below (enough for the
constructs this project writes). Where a `terraform` binary and a local provider mirror exist,
`terraform fmt -check` and `terraform validate` run as well."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TF_DIR = REPO / "infra" / "terraform"
DOCKERFILE = REPO / "infra" / "Dockerfile"
TF_FILES = ("main.tf", "variables.tf", "outputs.tf", "versions.tf")
REQUIRED_VARS = {"region", "bucket_name", "vpc_id", "subnet_ids", "cluster_name"}


def tf_sources():
    return {name: (TF_DIR / name).read_text() for name in TF_FILES}


# ============================================================================ a small HCL scanner


def _scan(text):
    """Yield (index, char, in_code) with comments removed; strings and heredocs count as not code."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "#" or text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            if j < 0:
                raise ValueError("unterminated /* comment")
            i = j + 2
            continue
        if text.startswith("<<", i):
            m = re.match(r"<<-?([A-Z_]+)\n", text[i:])
            if m:
                end = re.compile(r"^\s*" + m.group(1) + r"\s*$", re.M).search(text, i + m.end())
                if not end:
                    raise ValueError(f"unterminated heredoc {m.group(1)}")
                for k in range(i, end.end()):
                    yield k, text[k], False
                i = end.end()
                continue
        if c == '"':
            j, depth = i + 1, 0
            while j < n:
                if text[j] == "\\":
                    j += 2
                    continue
                if text.startswith("${", j):
                    depth += 1
                elif text[j] == "}" and depth:
                    depth -= 1
                elif text[j] == '"' and not depth:
                    break
                elif text[j] == "\n" and not depth:
                    raise ValueError(f"unterminated string at offset {i}")
                j += 1
            if j >= n:
                raise ValueError(f"unterminated string at offset {i}")
            for k in range(i, j + 1):
                yield k, text[k], False
            i = j + 1
            continue
        yield i, c, True
        i += 1


def strip_comments(text):
    keep = dict((i, c) for i, c, _ in _scan(text))
    return "".join(keep.get(i, " " if text[i] != "\n" else "\n") for i in range(len(text)))


def balance_problems(text, where=""):
    pairs, stack = {"}": "{", "]": "[", ")": "("}, []
    try:
        for i, c, code in _scan(text):
            if not code:
                continue
            if c in "{[(":
                stack.append((c, i))
            elif c in pairs:
                if not stack or stack[-1][0] != pairs[c]:
                    return [f"{where}: unbalanced {c!r} at line {text.count(chr(10), 0, i) + 1}"]
                stack.pop()
    except ValueError as e:
        return [f"{where}: {e}"]
    return [f"{where}: unclosed {c!r} from line {text.count(chr(10), 0, i) + 1}" for c, i in stack]


def _body(text, open_idx):
    """Text between the brace at open_idx and its match (code-aware)."""
    depth = 0
    for i, c, code in _scan(text[open_idx:]):
        if not code:
            continue
        depth += c == "{"
        depth -= c == "}"
        if depth == 0:
            return text[open_idx + 1: open_idx + i]
    raise ValueError("unclosed block")


_HEADER = re.compile(r'^(resource|data|variable|output|module|locals|provider)\b\s*((?:"[^"]*"\s*)*)\{', re.M)


def top_blocks(text):
    """[(kind, labels, body)] for the top-level blocks of one file."""
    clean = strip_comments(text)
    out = []
    for m in _HEADER.finditer(clean):
        labels = tuple(re.findall(r'"([^"]*)"', m.group(2)))
        out.append((m.group(1), labels, _body(clean, m.end() - 1)))
    return out


def sub_blocks(body, name):
    clean = body
    return [_body(clean, m.end() - 1) for m in re.finditer(r"(?<![\w.])" + name + r"\s*\{", clean)]


def _list_attr(body, name):
    """The quoted strings and bare references of `name = [ ... ]` (first level of body only)."""
    m = re.search(r"(?m)^\s*" + name + r"\s*=\s*", body)
    if not m:
        return None
    rest = body[m.end():]
    if rest.startswith("["):
        depth, j = 0, 0
        for j, ch in enumerate(rest):
            depth += ch in "[("
            depth -= ch in "])"
            if depth == 0:
                break
        expr = rest[: j + 1]
    else:
        expr = rest.split("\n", 1)[0]
    return re.findall(r'"((?:[^"\\]|\\.)*)"|([A-Za-z_][\w.\[\]-]*\.[\w.\[\]-]+)', expr)


def _values(pairs):
    return [a or b for a, b in pairs] if pairs else []


# ============================================================================ terraform checks


def terraform_problems(files):
    problems = []
    for name, text in files.items():
        problems += balance_problems(text, name)
    if problems:
        return problems

    blocks = [(name, *b) for name, text in files.items() for b in top_blocks(text)]
    variables = {labels[0]: body for _, kind, labels, body in blocks if kind == "variable"}
    resources = {labels[:2]: body for _, kind, labels, body in blocks if kind == "resource"}
    datas = {labels[:2]: body for _, kind, labels, body in blocks if kind == "data"}
    locals_ = set()
    for _, kind, _, body in blocks:
        if kind == "locals":
            locals_ |= set(re.findall(r"(?m)^\s*([A-Za-z_]\w*)\s*=", body))
    code = {name: strip_comments(text) for name, text in files.items()}
    everything = "\n".join(code.values())

    # variables: every var.X declared; the required ones exist and have no default
    for used in sorted(set(re.findall(r"\bvar\.([A-Za-z_][\w-]*)", everything)) - set(variables)):
        problems.append(f"var.{used} is used but not declared in variables.tf")
    for v in sorted(REQUIRED_VARS):
        if v not in variables:
            problems.append(f"required variable {v} is not declared")
        elif re.search(r"(?m)^\s*default\s*=", variables[v]):
            problems.append(f"required variable {v} must not have a default")
    for v, body in variables.items():
        if not re.search(r"(?m)^\s*type\s*=", body):
            problems.append(f"variable {v} has no type")
    for used in sorted(set(re.findall(r"\blocal\.([A-Za-z_]\w*)", everything)) - locals_):
        problems.append(f"local.{used} is used but not defined")

    # references to resources / data sources exist (outputs included)
    for t, n in sorted(set(re.findall(r"(?<![\w.])data\.(aws_\w+)\.([\w-]+)", everything))):
        if (t, n) not in datas:
            problems.append(f"data.{t}.{n} is referenced but not declared")
    for t, n in sorted(set(re.findall(r"(?<![\w.\"/])(aws_\w+)\.([A-Za-z_][\w-]*)", everything))):
        if (t, n) not in resources:
            problems.append(f"{t}.{n} is referenced but not declared")
    outputs = [(labels[0], body) for _, kind, labels, body in blocks if kind == "output"]
    if not outputs:
        problems.append("outputs.tf declares no outputs")
    for oname, body in outputs:
        if not re.search(r"(?m)^\s*value\s*=", body):
            problems.append(f"output {oname} has no value")

    # the bucket and its protections
    buckets = [n for t, n in resources if t == "aws_s3_bucket"]
    if len(buckets) != 1:
        problems.append(f"expected one aws_s3_bucket, found {buckets}")
    else:
        b = buckets[0]

        def attached(rtype):
            bodies = [body for (t, _), body in resources.items()
                      if t == rtype and re.search(rf"bucket\s*=\s*aws_s3_bucket\.{b}\.(id|bucket)\b", body)]
            if not bodies:
                problems.append(f"{rtype} for aws_s3_bucket.{b} is missing")
            return "\n".join(bodies)

        if not re.search(r'status\s*=\s*"Enabled"', attached("aws_s3_bucket_versioning")):
            problems.append("bucket versioning is not Enabled")
        if not re.search(r'sse_algorithm\s*=\s*"(aws:kms|aws:kms:dsse|AES256)"',
                         attached("aws_s3_bucket_server_side_encryption_configuration")):
            problems.append("bucket default encryption is not SSE-KMS / AES256")
        pab = attached("aws_s3_bucket_public_access_block")
        for flag in ("block_public_acls", "block_public_policy", "ignore_public_acls", "restrict_public_buckets"):
            if not re.search(rf"{flag}\s*=\s*true", pab):
                problems.append(f"public access block: {flag} is not true")
        lc = attached("aws_s3_bucket_lifecycle_configuration")
        if "noncurrent_version_expiration" not in lc:
            problems.append("lifecycle: no noncurrent_version_expiration rule")
        if "abort_incomplete_multipart_upload" not in lc:
            problems.append("lifecycle: no abort_incomplete_multipart_upload rule")

    # IAM policies: only aws_iam_policy_document or heredoc JSON (both checkable here)
    if re.search(r"(?m)^\s*(policy|assume_role_policy)\s*=\s*jsonencode\(", everything):
        problems.append("IAM policy written with jsonencode(); use data.aws_iam_policy_document or heredoc JSON")
    statements = []
    for (t, n), body in datas.items():
        if t == "aws_iam_policy_document":
            for st in sub_blocks(body, "statement"):
                effect = (_values(_list_attr(st, "effect")) or ["Allow"])[0]
                statements.append((f"data.{t}.{n}", effect, _values(_list_attr(st, "actions")),
                                   _values(_list_attr(st, "resources"))))
    for name, text in files.items():
        for m in re.finditer(r"<<-?([A-Z_]+)\n(.*?)^\s*\1\s*$", text, re.S | re.M):
            doc = m.group(2)
            if '"Statement"' not in doc:
                continue
            try:
                parsed = json.loads(re.sub(r"\$\{[^}]*\}", "X", doc))
            except json.JSONDecodeError as e:
                problems.append(f"{name}: heredoc policy is not valid JSON: {e}")
                continue
            sts = parsed["Statement"] if isinstance(parsed["Statement"], list) else [parsed["Statement"]]
            for st in sts:
                as_list = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
                statements.append((f"{name} heredoc", st.get("Effect", "Allow"),
                                   as_list(st.get("Action", [])), as_list(st.get("Resource", []))))
    if not statements:
        problems.append("no IAM policy statements found")
    for where, effect, actions, res in statements:
        if effect != "Allow":
            continue
        if any(a in ("*", "s3:*", "iam:*", "ec2:*") for a in actions):
            problems.append(f"{where}: wildcard action {actions}")
        if any(a.lower().startswith("s3:") for a in actions):
            for r in res:
                if r in ("*", "arn:aws:s3:::*") or "aws_s3_bucket." not in r:
                    problems.append(f"{where}: S3 actions on resource {r!r} (must be the project bucket's ARN or ARN/*)")
        if "iam:PassRole" in actions and any(r == "*" for r in res):
            problems.append(f"{where}: iam:PassRole on *")
        if any(a.startswith("ec2:") and not a.startswith("ec2:Describe") for a in actions) and "*" in res:
            problems.append(f"{where}: mutating EC2 actions on *")

    # the MLflow database: a managed / generated password, never a literal
    dbs = [body for (t, _), body in resources.items() if t == "aws_db_instance"]
    if not dbs:
        problems.append("no aws_db_instance for the MLflow backend store")
    for body in dbs:
        if not re.search(r"manage_master_user_password\s*=\s*true", body) and \
                not re.search(r"(?m)^\s*password\s*=\s*(random_password|aws_secretsmanager)", body):
            problems.append("aws_db_instance must use manage_master_user_password or a generated secret")
        if re.search(r'(?m)^\s*password\s*=\s*"', body):
            problems.append("aws_db_instance has a literal password")
    if "s3://" not in everything or "/mlflow" not in everything:
        problems.append("no MLflow artifact location s3://BUCKET/mlflow")
    return problems


# ============================================================================ Dockerfile checks


def dockerfile_problems(text):
    problems = []
    lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
    args = dict(re.findall(r"^ARG\s+([A-Za-z_]\w*)=(\S+)", "\n".join(lines), re.M))
    stages = []
    for ln in lines:
        m = re.match(r"FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", ln, re.I)
        if m:
            ref = re.sub(r"\$\{?(\w+)\}?", lambda a: args.get(a.group(1), a.group(0)), m.group(1))
            stages.append({"image": ref, "name": m.group(2), "user": None, "lines": []})
            if ref != "scratch" and not any(s["name"] == ref for s in stages[:-1]):
                last = ref.rsplit("/", 1)[-1]
                if "@sha256:" not in ref and ":" not in last:
                    problems.append(f"base image {ref} is not pinned by tag or digest")
                elif last.endswith(":latest"):
                    problems.append(f"base image {ref} uses the latest tag")
                elif "$" in ref:
                    problems.append(f"base image {ref} depends on an ARG without default")
            continue
        if stages:
            stages[-1]["lines"].append(ln)
            u = re.match(r"USER\s+(\S+)", ln, re.I)
            if u:
                stages[-1]["user"] = u.group(1)
    if not stages:
        return ["no FROM"]
    final = stages[-1]
    if final["user"] is None or final["user"].split(":")[0] in ("root", "0"):
        problems.append(f"final stage runs as {final['user'] or 'root (no USER)'}; needs a non-root USER")
    installs = [ln for ln in final["lines"] if re.search(r"\bpip install\b", ln)]
    if not any(re.search(r"(-c|--constraint)\s+\S*constraints\.txt", ln) for ln in installs):
        problems.append("the stack is not installed with -c constraints.txt")
    if not any(re.search(r'"?torch==', ln) and "constraints.txt" in ln for ln in installs):
        problems.append("torch is not pinned in the same pip command as the constraints (as make setup does)")
    if not re.search(r"index-url\s+\S+", " ".join(installs)):
        problems.append("no CUDA torch index URL in the pip command")
    if not re.search(r"RAY_USAGE_STATS_ENABLED=0", "\n".join(final["lines"])):
        problems.append("RAY_USAGE_STATS_ENABLED=0 not set in the image")
    return problems


# ============================================================================ secrets scan

SECRET_PATTERNS = [
    ("AWS access key id", re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")),
    ("private key", re.compile(r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")),
    ("literal password", re.compile(r"""(?i)\b\w*passw(?:or)?d\w*["']?\s*[:=]\s*["'][^"'$\s{][^"']*["']""")),
    ("AWS secret key", re.compile(r"""(?i)aws_secret_access_key["']?\s*[:=]\s*["']?[A-Za-z0-9/+]{40}""")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b")),
]


def secret_problems(files):
    out = []
    for name, text in files.items():
        for label, rx in SECRET_PATTERNS:
            for m in rx.finditer(text):
                out.append(f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {label}: {m.group(0)[:40]!r}")
    return out


def scanned_files():
    files = {}
    for root in (REPO / "cluster", REPO / "infra"):
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink() and ".terraform" not in p.parts and "__pycache__" not in p.parts:
                try:
                    files[str(p.relative_to(REPO))] = p.read_text()
                except UnicodeDecodeError:
                    continue
    return files


# ============================================================================ shipped files pass


def test_terraform_files_pass():
    assert terraform_problems(tf_sources()) == []


def test_dockerfile_passes():
    assert dockerfile_problems(DOCKERFILE.read_text()) == []


def test_no_secrets_in_cluster_and_infra():
    files = scanned_files()
    assert any(k.endswith("main.tf") for k in files) and any(k.endswith("aws.yaml") for k in files)
    assert secret_problems(files) == []


def test_dockerignore_and_build_script(tmp_path):
    ignore = REPO / "infra" / ".dockerignore"
    link = REPO / "infra" / "Dockerfile.dockerignore"
    assert link.is_symlink() and link.resolve() == ignore.resolve()
    rules = [ln.strip() for ln in ignore.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*" and "!rlr_dist/" in rules and "!constraints.txt" in rules
    for src in re.findall(r"(?m)^COPY\s+(?!--from)(\S+)", DOCKERFILE.read_text()):
        if src != "jobs":  # jobs/configs is added by the jobs work; the image build needs it then
            assert (REPO / src).exists(), src
    build = REPO / "infra" / "build.sh"
    assert os.access(build, os.X_OK)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PUSH": "0"}
    (tmp_path / "docker").write_text("#!/bin/sh\necho docker \"$@\" >> \"$(dirname \"$0\")/calls\"\n")
    (tmp_path / "docker").chmod(0o755)
    run = lambda image: subprocess.run(["bash", str(build)], env={**env, "IMAGE": image} if image else env,
                                       capture_output=True, text=True)
    assert run("ghcr.io/o/rlr-dist:latest").returncode == 2
    assert run("ghcr.io/o/rlr-dist").returncode == 2
    env.pop("IMAGE", None)
    assert run(None).returncode != 0
    ok = run("ghcr.io/o/rlr-dist:0.1.0")
    assert ok.returncode == 0, ok.stderr
    calls = (tmp_path / "calls").read_text()
    assert "-f infra/Dockerfile" in calls and "--target runtime -t ghcr.io/o/rlr-dist:0.1.0" in calls
    assert "push" not in calls


def _terraform_env():
    return {**os.environ, "CHECKPOINT_DISABLE": "1", "TF_IN_AUTOMATION": "1", "TF_INPUT": "0"}


@pytest.mark.skipif(shutil.which("terraform") is None, reason="no terraform binary")
def test_terraform_fmt():
    r = subprocess.run(["terraform", "fmt", "-check", "-diff", "-no-color", str(TF_DIR)],
                       capture_output=True, text=True, env=_terraform_env())
    assert r.returncode == 0, r.stdout + r.stderr


PLUGIN_DIR = Path(os.environ.get("TF_PLUGIN_DIR", "/opt/tf-plugins"))


@pytest.mark.skipif(shutil.which("terraform") is None or not (PLUGIN_DIR / "registry.terraform.io/hashicorp/aws").is_dir()
                    or os.environ.get("RLR_DIST_SKIP_TF_VALIDATE") == "1",
                    reason="no terraform binary or no local AWS provider mirror (TF_PLUGIN_DIR)")
def test_terraform_validate(tmp_path):
    """`terraform validate` against the AWS provider schema, offline: the provider comes from a local
    filesystem mirror (unpacked layout, so init links it instead of copying ~700 MB)."""
    work = tmp_path / "tf"
    work.mkdir()
    for name in TF_FILES:
        shutil.copy(TF_DIR / name, work / name)
    rc = tmp_path / "terraformrc"
    rc.write_text('provider_installation {\n  filesystem_mirror {\n    path = "%s"\n  }\n}\n' % PLUGIN_DIR)
    env = {**_terraform_env(), "TF_CLI_CONFIG_FILE": str(rc)}
    init = subprocess.run(["terraform", "init", "-backend=false", "-no-color"],
                          cwd=work, capture_output=True, text=True, env=env)
    assert init.returncode == 0, init.stdout + init.stderr
    val = subprocess.run(["terraform", "validate", "-no-color"], cwd=work, capture_output=True, text=True, env=env)
    assert val.returncode == 0, val.stdout + val.stderr


# ============================================================================ negative controls


def _mutate(name, old, new, count=1):
    files = tf_sources()
    assert old in files[name], old
    files[name] = files[name].replace(old, new, count)
    return files


@pytest.mark.parametrize("files, expected", [
    pytest.param(lambda: _mutate("outputs.tf", 'output "bucket_arn" {',
                                 'output "x" {\n  value = var.not_declared\n}\n\noutput "bucket_arn" {'),
                 "var.not_declared is used but not declared", id="undeclared-variable"),
    pytest.param(lambda: _mutate("variables.tf", "  type        = string\n}\n",
                                 '  type        = string\n  default     = "us-east-1"\n}\n'),
                 "required variable region must not have a default", id="required-variable-with-default"),
    pytest.param(lambda: _mutate("outputs.tf", "value = aws_s3_bucket.artifacts.arn",
                                 "value = aws_s3_bucket.checkpoints.arn"),
                 "aws_s3_bucket.checkpoints is referenced but not declared", id="output-to-missing-resource"),
    pytest.param(lambda: _mutate("main.tf", 'resources = ["${aws_s3_bucket.artifacts.arn}/*"]', 'resources = ["*"]'),
                 "S3 actions on resource '*'", id="s3-resource-star"),
    pytest.param(lambda: _mutate("main.tf", '"s3:GetObject",\n      "s3:PutObject",', '"s3:*",'),
                 "wildcard action", id="s3-action-star"),
    pytest.param(lambda: _mutate("main.tf", 'resource "aws_iam_role_policy" "ray_node" {',
                                 'resource "aws_iam_policy" "extra" {\n  policy = <<EOF\n{"Version": "2012-10-17", '
                                 '"Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]}\nEOF\n}\n\n'
                                 'resource "aws_iam_role_policy" "ray_node" {'),
                 "S3 actions on resource '*'", id="heredoc-s3-resource-star"),
    pytest.param(lambda: _mutate("main.tf", 'resource "aws_iam_role_policy" "ray_node" {',
                                 'resource "aws_iam_policy" "extra" {\n  policy = <<EOF\n{"Statement": [{"Action": "*",}]}\nEOF\n}\n\n'
                                 'resource "aws_iam_role_policy" "ray_node" {'),
                 "heredoc policy is not valid JSON", id="heredoc-bad-json"),
    pytest.param(lambda: _mutate("main.tf", 'resources = [aws_iam_role.ray_node.arn]', 'resources = ["*"]'),
                 "iam:PassRole on *", id="passrole-star"),
    pytest.param(lambda: _mutate("main.tf", "abort_incomplete_multipart_upload {", "noncurrent_version_transition {"),
                 "no abort_incomplete_multipart_upload", id="lifecycle-rule-missing"),
    pytest.param(lambda: _mutate("main.tf", "block_public_policy     = true", "block_public_policy     = false"),
                 "block_public_policy is not true", id="public-access-open"),
    pytest.param(lambda: _mutate("main.tf", 'status = "Enabled"\n  }\n}', 'status = "Suspended"\n  }\n}'),
                 "versioning is not Enabled", id="versioning-suspended"),
    pytest.param(lambda: _mutate("main.tf", "manage_master_user_password = true", 'password = "hunter2hunter2"'),
                 "literal password", id="db-literal-password"),
    pytest.param(lambda: _mutate("main.tf", "data \"aws_caller_identity\" \"current\" {}",
                                 "data \"aws_caller_identity\" \"current\" {"),
                 "unclosed", id="unbalanced-brace"),
])
def test_terraform_negative_controls(files, expected):
    problems = terraform_problems(files())
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("old, new, expected", [
    ("ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04", "ARG CUDA_IMAGE=nvidia/cuda:latest", "latest tag"),
    ("FROM python:3.11.11-slim-bookworm AS mlflow", "FROM python AS mlflow", "not pinned"),
    ("FROM ${CUDA_IMAGE} AS runtime", "FROM x:latest AS runtime", "latest tag"),
    ("USER ray\n", "USER root\n", "non-root USER"),
    ("USER ray\n", "", "non-root USER"),
    ("pip install -c constraints.txt --extra-index-url", "pip install --extra-index-url", "constraints.txt"),
    ("RAY_USAGE_STATS_ENABLED=0", "RAY_USAGE_STATS_ENABLED=1", "RAY_USAGE_STATS_ENABLED"),
])
def test_dockerfile_negative_controls(old, new, expected):
    text = DOCKERFILE.read_text()
    assert old in text, old
    problems = dockerfile_problems(text.replace(old, new))
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("snippet, label", [
    ("aws_access_key_id = " + "AKIA" + "ABCDEFGHIJKLMNOP", "AWS access key id"),
    ("-----BEGIN " + "RSA PRIVATE KEY-----\nMIIB...\n", "private key"),
    ('password = "' + 'correct-horse-battery"', "literal password"),
    ("db_password: '" + "s3cr3t-value'", "literal password"),
    ("token: gh" + "p_" + "a" * 36, "GitHub token"),
])
def test_secret_scan_negative_controls(snippet, label):
    files = scanned_files()
    name = next(k for k in files if k.endswith("aws.yaml"))
    files[name] += "\n" + snippet + "\n"
    assert any(label in p for p in secret_problems(files))
