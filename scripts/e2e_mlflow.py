#!/usr/bin/env python3
"""End-to-end scenario: the real MLflow client writing to an artifactfs mount (issue 6).

Run by scripts/e2e-mlflow.sh inside target/e2e-venv (mlflow 3 + scikit-learn) against a freshly
mounted store:

    python scripts/e2e_mlflow.py --mount MNT --store STORE --work DIR --bin target/release/artifactfs

The tracking backend is SQLite in DIR (outside the mount); the experiment's artifact_location is
file://MNT/runs. Every expected outcome is an assertion; a failed check does not stop the
scenario (later checks that need its result are SKIPped), and the exit status is 1 when any
check failed or was skipped. A summary table (check, result, seconds, detail) ends the output.
"""

import argparse
import errno
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import traceback

RESULTS = []  # (name, result, seconds, detail)
S = {}  # state shared between checks
LOGGED = []  # every LocalArtifactRepository.log_artifact(s) call: what the client was given


class Skip(Exception):
    pass


def need(*keys):
    missing = [k for k in keys if k not in S]
    if missing:
        raise Skip("needs " + ", ".join(missing))


def expect(cond, msg):
    if not cond:
        raise AssertionError(msg)


def check(name):
    """Runs the decorated function now and records PASS / FAIL / SKIP."""

    def deco(fn):
        t = time.monotonic()
        try:
            detail = fn() or ""
            result = "PASS"
        except Skip as e:
            result, detail = "SKIP", str(e)
        except BaseException as e:  # noqa: BLE001 - a check failure of any kind is recorded
            if isinstance(e, KeyboardInterrupt):
                raise
            result, detail = "FAIL", f"{type(e).__name__}: {e}"
            print(f"--- {name}: FAIL", file=sys.stderr)
            traceback.print_exc()
        dt = time.monotonic() - t
        RESULTS.append((name, result, dt, str(detail)))
        print(f"[{result}] {name} ({dt:.1f}s) {detail}", flush=True)
        return fn

    return deco


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def read(path):
    with open(path, "rb") as f:
        return f.read()


def tree_files(root):
    """{relative path: bytes} of every file below root."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = read(p)
    return out


def raised(fn):
    """The exception fn raised, or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


def describe(e):
    if e is None:
        return "nothing raised"
    en = getattr(e, "errno", None)
    name = errno.errorcode.get(en, en) if en is not None else None
    return f"{type(e).__name__}" + (f"[{name}]" if name else "") + f": {str(e)[:120]}"


def errno_in_chain(e):
    """errno names of e and its causes (MlflowException may wrap an OSError)."""
    names = []
    while e is not None:
        en = getattr(e, "errno", None)
        if isinstance(en, int):
            names.append(errno.errorcode.get(en, str(en)))
        e = e.__cause__ or e.__context__
    return names


def index_query(store, sql, params=()):
    """Rows of a read-only query on the store's index (small contents live there)."""
    db = sqlite3.connect(f"file:{os.path.join(store, 'index.sqlite')}?mode=ro", uri=True)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def blob_stats(store):
    """(contents, bytes) the store holds: blob files plus the small contents in its index."""
    files = size = 0
    for dirpath, _dirs, names in os.walk(os.path.join(store, "blobs")):
        for n in names:
            files += 1
            size += os.lstat(os.path.join(dirpath, n)).st_size
    [(n, total)] = index_query(store, "SELECT COUNT(*), COALESCE(SUM(length(data)), 0) FROM inline_content")
    return files + n, size + total


def stored_bytes(store, h):
    """The stored bytes of content h: in the index when small, else its blob file."""
    rows = index_query(store, "SELECT data FROM inline_content WHERE hash = ?", (h,))
    if rows:
        return bytes(rows[0][0])
    blob = os.path.join(store, "blobs", "sha256", h[:2], h[2:])
    return read(blob) if os.path.isfile(blob) else None


def verify_stored(path, data, store):
    """The file at path has bytes data, its xattr names their hash, and the store holds them."""
    got = read(path)
    expect(got == data, f"{path}: {len(got)} bytes read differ from the {len(data)} bytes logged")
    h = sha256(data)
    x = os.getxattr(path, "user.artifactfs.sha256").decode()
    expect(x == h, f"{path}: xattr sha256 {x} != {h}")
    stored = stored_bytes(store, h)
    expect(stored is not None, f"{path}: the store has no content {h}")
    expect(stored == data, f"{path}: the store's content {h} has other bytes")


def install_recorder():
    """Wraps LocalArtifactRepository.log_artifact(s) to snapshot what the client hands over."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository as Repo

    orig_file, orig_dir = Repo.log_artifact, Repo.log_artifacts

    def log_artifact(self, local_file, artifact_path=None):
        d = os.path.join(self.artifact_dir, artifact_path) if artifact_path else self.artifact_dir
        rec = {
            "call": "log_artifact",
            "dest": os.path.join(d, os.path.basename(local_file)),
            "files": {"": read(local_file)},
            "ok": False,
        }
        LOGGED.append(rec)
        orig_file(self, local_file, artifact_path)
        rec["ok"] = True

    def log_artifacts(self, local_dir, artifact_path=None):
        d = os.path.join(self.artifact_dir, artifact_path) if artifact_path else self.artifact_dir
        rec = {"call": "log_artifacts", "dest": d, "files": tree_files(local_dir), "ok": False}
        LOGGED.append(rec)
        orig_dir(self, local_dir, artifact_path)
        rec["ok"] = True

    Repo.log_artifact, Repo.log_artifacts = log_artifact, log_artifacts


def client_tree(list_fn, path=None):
    """{path: size} of every file a list_artifacts-like function reports, recursively."""
    out = {}
    for fi in list_fn(path):
        if fi.is_dir:
            out.update(client_tree(list_fn, fi.path))
        else:
            out[fi.path] = fi.file_size
    return out


def cli(args, *rest, timeout=120):
    p = subprocess.run(
        [args.bin, *rest], capture_output=True, text=True, timeout=timeout, check=False
    )
    return p.returncode, p.stdout, p.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mount", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--work", required=True, help="scratch dir outside the mount (sqlite db, inputs)")
    ap.add_argument("--bin", required=True, help="the artifactfs binary")
    args = ap.parse_args()
    mnt, store, work = (os.path.abspath(p) for p in (args.mount, args.store, args.work))
    t_start = time.monotonic()

    t = time.monotonic()
    import warnings

    warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
    import numpy as np
    import yaml
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    import mlflow
    import mlflow.sklearn
    from mlflow import MlflowClient

    print(f"imports: {time.monotonic() - t:.1f}s (mlflow {mlflow.__version__})", flush=True)
    install_recorder()

    # ---- inputs, outside the mount --------------------------------------------------------------
    src = os.path.join(work, "inputs")
    os.makedirs(os.path.join(src, "tree", "sub", "deeper"), exist_ok=True)
    os.makedirs(os.path.join(src, "tree", "bin"), exist_ok=True)
    single = os.path.join(src, "single.txt")
    with open(single, "w") as f:
        f.write("one artifact file\n")
    rnd = np.random.default_rng(6)
    tree_content = {
        "a.txt": b"top-level text\n",
        "empty.txt": b"",
        "bin/small.bin": bytes(range(256)) * 4,
        "bin/large.bin": rnd.bytes(3 * 1024 * 1024 + 17),  # a few MiB: the daemon's tmp/ path
        "sub/b.json": b'{"k": [1, 2, 3]}\n',
        "sub/deeper/c.csv": b"x,y\n1,2\n3,4\n",
        "sub/deeper/ünï cödé.dat": b"\x00\xff\x00binary\r\n",
    }
    for rel, data in tree_content.items():
        with open(os.path.join(src, "tree", rel), "wb") as f:
            f.write(data)
    text_content = "notes from the run\nsecond line: ünïcödé\n"
    dict_content = {"lr": 0.1, "layers": [4, 8, 3], "name": "iris"}

    X, y = load_iris(return_X_y=True, as_frame=True)
    model = LogisticRegression(max_iter=1000).fit(X, y)
    preds = model.predict(X)
    model2 = LogisticRegression(C=0.01, max_iter=1000).fit(X, y)
    preds2 = model2.predict(X)
    example = X.head(3)

    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    client = MlflowClient()
    runs_uri = f"file://{mnt}/runs"

    # ---- run artifacts --------------------------------------------------------------------------
    @check("experiment with artifact_location file://MNT/runs")
    def _():
        exp_id = mlflow.create_experiment("artifactfs-e2e", artifact_location=runs_uri)
        exp = client.get_experiment(exp_id)
        expect(exp.artifact_location == runs_uri, f"artifact_location {exp.artifact_location}")
        run = mlflow.start_run(experiment_id=exp_id)
        S["run_id"] = run.info.run_id
        expect(
            run.info.artifact_uri == f"{runs_uri}/{S['run_id']}/artifacts",
            f"run artifact_uri {run.info.artifact_uri}",
        )
        return f"run {S['run_id']}"

    def run_path(*parts):
        return os.path.join(mnt, "runs", S["run_id"], "artifacts", *parts)

    @check("log_param + log_metric")
    def _():
        need("run_id")
        mlflow.log_param("C", 1.0)
        mlflow.log_metric("train_accuracy", float((preds == y).mean()))
        data = client.get_run(S["run_id"]).data
        expect(data.params.get("C") == "1.0", f"params {data.params}")
        expect(abs(data.metrics["train_accuracy"] - (preds == y).mean()) < 1e-12, "metric")

    expected = {}  # run-relative artifact path -> bytes

    @check("log_artifact (file) -> runs/<run>/artifacts/single.txt")
    def _():
        need("run_id")
        mlflow.log_artifact(single)
        expected["single.txt"] = read(single)
        verify_stored(run_path("single.txt"), expected["single.txt"], store)
        S["log_artifact"] = True

    @check("log_artifacts (dir, subdirs, binary+text)")
    def _():
        need("run_id")
        mlflow.log_artifacts(os.path.join(src, "tree"), artifact_path="tree")
        for rel, data in tree_content.items():
            expected["tree/" + rel] = data
            verify_stored(run_path("tree", rel), data, store)
        S["log_artifacts"] = True
        return f"{len(tree_content)} files, {sum(map(len, tree_content.values()))} bytes"

    @check("log_text -> notes/readme.txt")
    def _():
        need("run_id")
        mlflow.log_text(text_content, "notes/readme.txt")
        expected["notes/readme.txt"] = text_content.encode()
        verify_stored(run_path("notes", "readme.txt"), expected["notes/readme.txt"], store)
        S["log_text"] = True

    @check("log_dict -> config/params.json + .yaml")
    def _():
        need("run_id")
        mlflow.log_dict(dict_content, "config/params.json")
        mlflow.log_dict(dict_content, "config/params.yaml")
        j = read(run_path("config", "params.json"))
        yml = read(run_path("config", "params.yaml"))
        expect(json.loads(j) == dict_content, f"json content {j!r}")
        expect(yaml.safe_load(yml) == dict_content, f"yaml content {yml!r}")
        expected["config/params.json"] = j
        expected["config/params.yaml"] = yml
        S["log_dict"] = True

    @check("sklearn.log_model (iris LogisticRegression)")
    def _():
        need("run_id")
        n0 = len(LOGGED)
        info = mlflow.sklearn.log_model(model, name="model", input_example=example)
        S["model_info"] = info
        S["model_id"] = info.model_id
        model_calls = [r for r in LOGGED[n0:] if r["call"] == "log_artifacts" and r["ok"]]
        expect(len(model_calls) == 1, f"{len(model_calls)} log_artifacts calls for the model")
        S["model_files"] = model_calls[0]["files"]
        S["model_dest"] = model_calls[0]["dest"]
        return f"model_id {info.model_id}, uri {info.model_uri}"

    @check("logged model lives at runs/models/<model_id>/artifacts")
    def _():
        need("model_id", "model_files")
        mid = S["model_id"]
        lm = client.get_logged_model(mid)
        want = f"{runs_uri}/models/{mid}/artifacts"
        expect(lm.artifact_location == want, f"artifact_location {lm.artifact_location} != {want}")
        mdir = os.path.join(mnt, "runs", "models", mid, "artifacts")
        expect(os.path.realpath(S["model_dest"]) == mdir, f"log_artifacts went to {S['model_dest']}")
        on_disk = tree_files(mdir)
        expect(set(on_disk) == set(S["model_files"]), f"{sorted(on_disk)} != {sorted(S['model_files'])}")
        for rel, data in S["model_files"].items():
            verify_stored(os.path.join(mdir, rel), data, store)
        expect(not os.path.exists(run_path("model")), "a copy also went to runs/<run>/artifacts/model")
        S["model_dir"] = mdir
        return ", ".join(sorted(on_disk))

    @check("logged MLmodel records run_id / model_id")
    def _():
        need("model_dir")
        m = yaml.safe_load(read(os.path.join(S["model_dir"], "MLmodel")))
        S["mlmodel"] = m
        expect(m.get("run_id") == S["run_id"], f"MLmodel run_id {m.get('run_id')!r}")
        expect(m.get("model_id") == S["model_id"], f"MLmodel model_id {m.get('model_id')!r}")
        return f"run_id={m.get('run_id')} model_id={m.get('model_id')} artifact_path={m.get('artifact_path')}"

    # ---- every logged byte, through the client ----------------------------------------------------
    @check("every client upload is stored byte-identical")
    def _():
        need("run_id")
        ok = [r for r in LOGGED if r["ok"]]
        expect(ok, "no log_artifact(s) call recorded")
        n = 0
        for r in ok:
            for rel, data in r["files"].items():
                verify_stored(os.path.join(r["dest"], rel) if rel else r["dest"], data, store)
                n += 1
        return f"{len(ok)} calls, {n} files"

    @check("run dir holds exactly the logged files (no temp leftovers)")
    def _():
        need("run_id", "log_artifact", "log_artifacts", "log_text", "log_dict")
        on_disk = tree_files(run_path())
        expect(set(on_disk) == set(expected), f"extra {sorted(set(on_disk) - set(expected))}, "
               f"missing {sorted(set(expected) - set(on_disk))}")
        for rel, data in expected.items():
            expect(on_disk[rel] == data, f"{rel} differs")

    @check("MlflowClient.list_artifacts (run, recursive)")
    def _():
        need("run_id", "log_artifact", "log_artifacts", "log_text", "log_dict")
        got = client_tree(lambda p: client.list_artifacts(S["run_id"], p))
        want = {k: len(v) for k, v in expected.items()}
        expect(got == want, f"list_artifacts {got} != {want}")
        return f"{len(got)} files"

    @check("list_logged_model_artifacts (model)")
    def _():
        need("model_id", "model_files")
        got = client_tree(lambda p: client.list_logged_model_artifacts(S["model_id"], p))
        want = {k: len(v) for k, v in S["model_files"].items()}
        expect(got == want, f"{got} != {want}")

    @check("mlflow.artifacts.download_artifacts (run + model)")
    def _():
        need("run_id", "log_artifact", "log_artifacts", "log_text", "log_dict")
        dl = mlflow.artifacts.download_artifacts(run_id=S["run_id"], dst_path=os.path.join(work, "dl-run"))
        got = tree_files(dl)
        expect(got == expected, f"downloaded run artifacts differ: {sorted(got)}")
        one = mlflow.artifacts.download_artifacts(
            artifact_uri=f"runs:/{S['run_id']}/tree/bin/large.bin", dst_path=os.path.join(work, "dl-one")
        )
        expect(read(one) == tree_content["bin/large.bin"], "single-file download differs")
        need("model_info", "model_files")
        dlm = mlflow.artifacts.download_artifacts(
            artifact_uri=S["model_info"].model_uri, dst_path=os.path.join(work, "dl-model")
        )
        got = tree_files(dlm)
        # MLflow adds registered_model_meta to every models:/ download (into dst_path here).
        got.pop("registered_model_meta", None)
        expect(got == S["model_files"], "downloaded model differs from what was logged")

    @check("pyfunc.load_model(logged model) predicts the same")
    def _():
        need("model_info", "model_dir")
        uris = [S["model_info"].model_uri, f"runs:/{S['run_id']}/model", S["model_dir"]]
        for uri in uris:
            p = np.asarray(mlflow.pyfunc.load_model(uri).predict(X))
            expect(np.array_equal(p, preds), f"{uri}: predictions differ")
        S["loaded_once"] = True
        # MLflow's ModelsArtifactRepository writes registered_model_meta into the model dir it
        # loads from (here: the artifact store itself, since file:// needs no download).
        meta = os.path.join(S["model_dir"], "registered_model_meta")
        if os.path.exists(meta):
            return f"{', '.join(uris[:2])}, path; MLflow wrote registered_model_meta {read(meta)!r}"
        return ", ".join(uris[:2]) + ", path"

    @check("load_model of models:/<model_id> and models:/<name>/<version>, repeated and alternated")
    def _():
        # MLflow 3 writes registered_model_meta (O_TRUNC, overwrite=True) into the logged
        # model's own artifact directory on every models:/ load from a file:// store: model_name
        # null for models:/<model_id>, the name and version for models:/<name>/<version>. It is
        # the one rewritable name (README), so every load works, in any order, any number of
        # times; its earlier contents are history (artifactfs ls --history).
        need("loaded_once", "model_info")
        version = mlflow.register_model(S["model_info"].model_uri, "e2e-lr").version
        uris = [S["model_info"].model_uri, f"models:/e2e-lr/{version}"] * 3
        meta = os.path.join(S["model_dir"], "registered_model_meta")
        seen = []
        for uri in uris:
            m = mlflow.pyfunc.load_model(uri)
            expect(np.array_equal(np.asarray(m.predict(X)), preds), f"{uri}: predictions differ")
            seen.append(read(meta))
        expect(b"e2e-lr" in seen[1] and b"e2e-lr" not in seen[0], f"registered_model_meta: {seen[:2]}")
        expect(seen[0::2] == [seen[0]] * 3 and seen[1::2] == [seen[1]] * 3, "meta alternates")
        for i in range(2):
            dst = os.path.join(work, f"load-{i}")
            os.makedirs(dst)
            m = mlflow.pyfunc.load_model(S["model_info"].model_uri, dst_path=dst)
            expect(np.array_equal(np.asarray(m.predict(X)), preds), "predictions differ")
        rc, stdout, stderr = cli(args, "ls", "--history", "--store", store, os.path.relpath(meta, mnt))
        expect(rc == 0, f"ls --history: {stderr}")
        lines = stdout.splitlines()
        expect(len(lines) >= 6 and lines[-1].endswith("current"), f"history: {stdout}")
        return f"{len(uris)} loads; registered_model_meta has {len(lines)} contents in its history"

    @check("download_artifacts of a run's files to a destination, twice")
    def _():
        need("run_id")
        for i in range(2):
            dst = os.path.join(work, f"dl-again-{i}")
            got = mlflow.artifacts.download_artifacts(run_id=S["run_id"], dst_path=dst)
            expect(os.path.isdir(got), f"download to {dst}: {got}")
        return "ok"

    # ---- immutability through the client --------------------------------------------------------
    other = os.path.join(work, "other", "single.txt")
    os.makedirs(os.path.dirname(other), exist_ok=True)
    with open(other, "w") as f:
        f.write("a different second version\n")

    def no_temp_leftovers():
        for dirpath, _d, files in os.walk(run_path()):
            bad = [f for f in files if f.startswith(".artifact.uploading.")]
            expect(not bad, f"temp files left in {dirpath}: {bad}")

    @check("log_artifact of the same file twice to the same path succeeds; content unchanged")
    def _():
        need("log_artifact")
        mlflow.log_artifact(single)
        expect(read(run_path("single.txt")) == expected["single.txt"], "single.txt changed")
        no_temp_leftovers()

    @check("log_artifact same path twice raises; first bytes kept")
    def _():
        need("log_artifact")
        e = raised(lambda: mlflow.log_artifact(other))
        expect(e is not None, "second log_artifact of single.txt did not raise")
        expect(read(run_path("single.txt")) == expected["single.txt"], "single.txt changed")
        no_temp_leftovers()
        return describe(e)

    @check("log_text same path twice raises; first bytes kept")
    def _():
        need("log_text")
        e = raised(lambda: mlflow.log_text("replacement\n", "notes/readme.txt"))
        expect(e is not None, "second log_text did not raise")
        expect(read(run_path("notes", "readme.txt")) == expected["notes/readme.txt"], "readme changed")
        no_temp_leftovers()
        return describe(e)

    @check("log_dict same path twice raises; first bytes kept")
    def _():
        need("log_dict")
        e = raised(lambda: mlflow.log_dict({"lr": 9}, "config/params.json"))
        expect(e is not None, "second log_dict did not raise")
        expect(read(run_path("config", "params.json")) == expected["config/params.json"], "changed")
        no_temp_leftovers()
        return describe(e)

    @check("log_artifacts same paths twice raises; first bytes kept")
    def _():
        need("log_artifacts")
        d = os.path.join(work, "tree2")
        os.makedirs(os.path.join(d, "sub"), exist_ok=True)
        with open(os.path.join(d, "a.txt"), "wb") as f:
            f.write(b"overwritten?\n")
        e = raised(lambda: mlflow.log_artifacts(d, artifact_path="tree"))
        expect(e is not None, "second log_artifacts did not raise")
        expect(read(run_path("tree", "a.txt")) == tree_content["a.txt"], "tree/a.txt changed")
        no_temp_leftovers()
        return describe(e)

    @check("run still usable after refusals (new path logs fine)")
    def _():
        need("run_id")
        mlflow.log_text("after the refusals\n", "notes/later.txt")
        expected["notes/later.txt"] = b"after the refusals\n"
        verify_stored(run_path("notes", "later.txt"), expected["notes/later.txt"], store)
        mlflow.end_run()
        expect(client.get_run(S["run_id"]).info.status == "FINISHED", "run not FINISHED")

    # ---- model registry: save_model into models/ ---------------------------------------------------
    iris = os.path.join(mnt, "models", "iris")

    def wait(name, d):
        return cli(args, "models", "wait", "--store", store, name, d, "--timeout", "60")

    @check("save_model models/iris/v1 + models wait -> READY version 1")
    def _():
        t = time.monotonic()
        mlflow.sklearn.save_model(model, os.path.join(iris, "v1"), input_example=example)
        t_save = time.monotonic() - t
        rc, out, err = wait("iris", "v1")
        expect(rc == 0, f"models wait iris v1: exit {rc}: {out.strip()} {err.strip()}")
        expect("READY version 1" in out, f"models wait said {out.strip()!r}")
        v1 = os.path.join(iris, "v1")
        expect(os.getxattr(v1, "user.artifactfs.status") == b"READY", "status xattr")
        expect(os.getxattr(v1, "user.artifactfs.version") == b"1", "version xattr")
        S["v1"] = True
        return f"save_model {t_save:.1f}s; {out.strip()}"

    @check("models/iris/latest -> v1, 1 -> v1; load_model(latest) predicts the same")
    def _():
        need("v1")
        expect(os.readlink(os.path.join(iris, "latest")) == "v1", "latest")
        expect(os.readlink(os.path.join(iris, "1")) == "v1", "1")
        p = np.asarray(mlflow.pyfunc.load_model(os.path.join(iris, "latest")).predict(X))
        expect(np.array_equal(p, preds), "predictions differ")

    @check("READY version is sealed (create inside -> EPERM)")
    def _():
        need("v1")
        mlmodel = read(os.path.join(iris, "v1", "MLmodel"))
        e = raised(lambda: open(os.path.join(iris, "v1", "extra.txt"), "x").close())
        expect(getattr(e, "errno", None) == errno.EPERM, f"create in v1: {describe(e)}")
        e2 = raised(lambda: mlflow.sklearn.save_model(model2, os.path.join(iris, "v1")))
        expect(e2 is not None, "save_model over v1 did not raise")
        expect(read(os.path.join(iris, "v1", "MLmodel")) == mlmodel, "v1/MLmodel changed")
        return f"save_model over v1: {describe(e2)}"

    @check("save_model models/iris/v2 -> version 2, latest moves")
    def _():
        need("v1")
        expect(not np.array_equal(preds, preds2), "precondition: model2 predicts like model")
        mlflow.sklearn.save_model(model2, os.path.join(iris, "v2"), input_example=example)
        rc, out, err = wait("iris", "v2")
        expect(rc == 0 and "READY version 2" in out, f"wait iris v2: exit {rc}: {out.strip()} {err.strip()}")
        expect(os.readlink(os.path.join(iris, "latest")) == "v2", "latest did not move to v2")
        expect(os.readlink(os.path.join(iris, "2")) == "v2", "2 -> v2")
        expect(os.readlink(os.path.join(iris, "1")) == "v1", "1 -> v1")
        p = np.asarray(mlflow.pyfunc.load_model(os.path.join(iris, "latest")).predict(X))
        expect(np.array_equal(p, preds2), "latest does not predict like model2")
        S["v2"] = True
        return out.strip()

    # ---- register the logged model by copying it ------------------------------------------------------
    @check("copytree runs/models/<id>/artifacts -> models/iris/from-run: READY, 0 new blob bytes")
    def _():
        need("model_dir", "v2")
        before = blob_stats(store)
        shutil.copytree(S["model_dir"], os.path.join(iris, "from-run"))
        rc, out, err = wait("iris", "from-run")
        after = blob_stats(store)
        expect(rc == 0 and "READY version 3" in out, f"wait: exit {rc}: {out.strip()} {err.strip()}")
        expect(after == before, f"contents (count, bytes) {before} -> {after}")
        expect(os.readlink(os.path.join(iris, "latest")) == "from-run", "latest")
        expect(tree_files(os.path.join(iris, "from-run")) == tree_files(S["model_dir"]), "copy differs")
        p = np.asarray(mlflow.pyfunc.load_model(os.path.join(iris, "3")).predict(X))
        expect(np.array_equal(p, preds), "models/iris/3 predictions differ")
        S["v3"] = True
        return f"contents: {before[0]} / {before[1]} bytes before and after"

    @check("models show iris 3 records the run id")
    def _():
        need("v3")
        rc, out, err = cli(args, "models", "show", "--store", store, "iris", "3")
        expect(rc == 0, f"exit {rc}: {err.strip()}")
        fields = {}
        for line in out.splitlines():
            k, sep, v = line.partition(":")
            if sep and not line.startswith(" "):
                fields[k.strip()] = v.strip()
        expect(fields.get("run_id") == S["run_id"], f"run_id: {fields.get('run_id')!r} != {S['run_id']}")
        expect(fields.get("status") == "READY", f"status {fields.get('status')!r}")
        return " ".join(f"{k}={fields.get(k)}" for k in ("run_id", "model_uuid", "artifact_path"))

    # ---- summary ---------------------------------------------------------------------------------------
    rc, out, _ = cli(args, "models", "list", "--store", store)
    print(out)
    w = max(len(r[0]) for r in RESULTS)
    print(f"\n{'check':<{w}}  result   secs  detail")
    print(f"{'-' * w}  ------  -----  ------")
    for name, result, dt, detail in RESULTS:
        print(f"{name:<{w}}  {result:<6}  {dt:5.1f}  {detail[:150]}")
    bad = [r for r in RESULTS if r[1] != "PASS"]
    print(f"\nscenario: {len(RESULTS) - len(bad)}/{len(RESULTS)} passed in {time.monotonic() - t_start:.1f}s")
    # For the shell script's closing "N passed, N failed" line.
    with open(os.path.join(work, "scenario-counts"), "w") as f:
        f.write(f"{len(RESULTS) - len(bad)} {len(RESULTS)}\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
