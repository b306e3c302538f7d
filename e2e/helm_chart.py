#!/usr/bin/env python3
"""Helm chart checks for e2e/helm.sh.

Two Helm libraries from PyPI, each a Go shared library, so each runs in its
own process (two Go runtimes must not share one):

* helm-sdkpy (`helm_sdkpy`): `Lint`, the gate. Its Lint takes only a chart
  path, so non-default values are linted on a copy of the chart whose
  values.yaml holds the merged values (`prepare`).
* helm-python-sdk (`helm_python`): offline rendering (`Chart.render`), a YAML
  parser, and lint messages with their text (`diagnose`).

Subcommands:
  prepare CHART OVERRIDES.json OUT_CHART_DIR   copy CHART with values = defaults + overrides
  lint CHART_DIR                               helm-sdkpy Lint; exit 1 on any warning or error
  diagnose CHART_DIR                           helm-python-sdk lint messages (why lint failed)
  render CHART OUT_DIR [OVERRIDES.json]        render; write objects.json, values.json,
                                               NOTES.txt and config/<configmap>.toml
  check NAME OUT_DIR [ARG]                     one assertion on a rendered chart (see CHECKS)
  k8s-version                                  the Kubernetes release the schemas check targets
  gateway-nodes-override OUT_DIR ADDR...       TOML inline array of the rendered gateway's
                                               storage nodes with the given addresses
  gateway-scp OUT_DIR                          the rendered [dicom.scp] AE titles: called,
                                               then the calling ones, one a line
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import shlex
import shutil
import sys
import tomllib
from pathlib import Path, PurePosixPath

SEVERITY = {0: "unknown", 1: "info", 2: "warning", 3: "error"}


def merge(base, over):
    """Helm's value coalescing: maps merge key by key, anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base.get(k), v) if k in base else copy.deepcopy(v)
        return out
    return copy.deepcopy(over)


def load_overrides(path: str | None) -> dict:
    if not path:
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --------------------------------------------------------------- helm_python


def cmd_prepare(chart: str, overrides: str, out: str) -> None:
    import helm_python as hp

    with hp.chart.Chart.load(chart) as c:
        values = merge(c.values, load_overrides(overrides))
    out_dir = Path(out)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(chart, out_dir)
    # JSON is YAML: the copy's values.yaml is the merged values.
    (out_dir / "values.yaml").write_text(json.dumps(values, indent=2) + "\n", encoding="utf-8")


def cmd_diagnose(chart: str) -> None:
    import helm_python as hp

    report = hp.chart.lint(chart, strict=True)
    for m in report.get("messages", []):
        print(f"[{SEVERITY.get(m['severity'], m['severity'])}] {m['path']}: {m['error'].strip()}")


def split_documents(text: str) -> list[str]:
    docs, cur = [], []
    for line in text.splitlines():
        if line.rstrip() == "---":
            docs.append("\n".join(cur))
            cur = []
        else:
            cur.append(line)
    docs.append("\n".join(cur))
    return [d for d in docs if any(l.strip() and not l.lstrip().startswith("#") for l in d.splitlines())]


def cmd_render(chart: str, out: str, overrides: str | None) -> None:
    import helm_python as hp

    with hp.chart.Chart.load(chart) as c:
        values = merge(c.values, load_overrides(overrides))
        manifests = c.render(values, name="tessera", namespace="tessera", is_install=True)
    out_dir = Path(out)
    (out_dir / "config").mkdir(parents=True, exist_ok=True)
    objects = []
    for path in sorted(manifests):
        text = manifests[path]
        if path.endswith("NOTES.txt"):
            (out_dir / "NOTES.txt").write_text(text, encoding="utf-8")
            continue
        for doc in split_documents(text):
            obj = hp.chart.values_from_yaml(doc)
            if obj:
                objects.append({"template": path, "object": obj})
    for o in objects:
        obj = o["object"]
        if obj.get("kind") == "ConfigMap" and "config.toml" in obj.get("data", {}):
            name = obj["metadata"]["name"]
            (out_dir / "config" / f"{name}.toml").write_text(obj["data"]["config.toml"], encoding="utf-8")
    (out_dir / "objects.json").write_text(json.dumps(objects, indent=1), encoding="utf-8")
    (out_dir / "values.json").write_text(json.dumps(values, indent=1), encoding="utf-8")
    print(f"{len(objects)} objects from {len(manifests)} templates")


# ---------------------------------------------------------------- helm_sdkpy


def cmd_lint(chart: str) -> int:
    import helm_sdkpy

    config = helm_sdkpy.Configuration(namespace="tessera")
    report = asyncio.run(helm_sdkpy.Lint(config).run(chart))
    messages = report.get("Messages") or []
    bad = [m for m in messages if m.get("Severity", 0) >= 2]
    for m in messages:
        print(f"[{SEVERITY.get(m.get('Severity'), m.get('Severity'))}] {m.get('Path')}")
    print(f"linted {report.get('TotalChartsLinted')} chart(s): {len(bad)} warning(s)/error(s)")
    if report.get("TotalChartsLinted") != 1:
        return 1
    return 1 if bad or report.get("Errors") else 0


# -------------------------------------------------------------------- checks


class Rendered:
    def __init__(self, out: str):
        d = Path(out)
        self.objects = [o["object"] for o in json.loads((d / "objects.json").read_text())]
        self.values = json.loads((d / "values.json").read_text())
        self.configs = {p.stem: tomllib.loads(p.read_text()) for p in (d / "config").glob("*.toml")}
        self.notes = (d / "NOTES.txt").read_text() if (d / "NOTES.txt").exists() else ""

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o.get("kind") == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        if len(found) != 1:
            raise AssertionError(f"expected one {kind} {name!r}, found {len(found)}")
        return found[0]

    def workloads(self) -> list[dict]:
        return [o for o in self.objects if o.get("kind") in ("Deployment", "StatefulSet")]

    def service_port(self, name: str) -> int:
        svc = self.get("Service", name)
        ports = svc["spec"]["ports"]
        grpc = [p for p in ports if p["name"] == "grpc"]
        # The gateway's second port, DICOMweb (check_dicomweb), when enabled.
        others = [p["name"] for p in ports if p["name"] != "grpc"]
        assert len(grpc) == 1 and others in ([], ["dicomweb"]) and (not others or name == "gateway"), \
            f"Service {name}: one port named grpc (and the gateway's dicomweb), not {[p['name'] for p in ports]}"
        return int(grpc[0]["port"])

    def config_of(self, workload: dict) -> tuple[str, dict]:
        """(configmap name, parsed TOML) mounted by a workload."""
        for v in workload["spec"]["template"]["spec"]["volumes"]:
            if "configMap" in v:
                name = v["configMap"]["name"]
                return name, self.configs[name]
        raise AssertionError(f"{workload['metadata']['name']}: no config volume")


def storage_count(r: Rendered) -> int:
    return int(r.values["storage"]["replicas"])


def check_storage_nodes(r: Rendered, arg: str | None) -> None:
    n = int(arg) if arg else storage_count(r)
    expected = [f"storage-{i}" for i in range(1, n + 1)]
    gw = r.configs["gateway-config"]
    names = [s["name"] for s in gw["storage_nodes"]]
    assert names == expected, f"gateway storage_nodes {names} != {expected}"
    for s in gw["storage_nodes"]:
        port = r.service_port(s["name"])
        assert s["address"] == f"{s['name']}:{port}", f"{s['name']}: address {s['address']!r}, Service port {port}"
        sts = r.get("StatefulSet", s["name"])
        cm_name, cfg = r.config_of(sts)
        assert cfg["node_id"] == s["name"], f"{cm_name}: node_id {cfg['node_id']!r} != {s['name']!r}"
        assert sts["spec"]["replicas"] == 1, f"{s['name']}: one replica"
    sts_names = sorted(o["metadata"]["name"] for o in r.of_kind("StatefulSet") if o["metadata"]["name"].startswith("storage-"))
    assert sts_names == sorted(expected), f"storage StatefulSets {sts_names} != {expected}"
    node_ids = sorted(c["node_id"] for c in r.configs.values() if "node_id" in c)
    assert node_ids == sorted(expected), f"node_ids {node_ids} are not distinct storage-1..{n}"


def check_erasure(r: Rendered, arg: str | None) -> None:
    """`off`, or `K+M/zone,zone,...`: the gateway's [erasure] and node zones."""
    gw = r.configs["gateway-config"]
    if arg == "off":
        assert "erasure" not in gw, f"[erasure] rendered: {gw.get('erasure')}"
        assert all("zone" not in s for s in gw["storage_nodes"]), gw["storage_nodes"]
        return
    scheme, _, zones = (arg or "").partition("/")
    k, m = (int(x) for x in scheme.split("+"))
    e = gw.get("erasure")
    assert e and e["data"] == k and e["parity"] == m, f"[erasure] {e} != {k}+{m}"
    assert k + m <= len(gw["storage_nodes"]), f"{k}+{m} fragments on {len(gw['storage_nodes'])} nodes"
    assert e.get("hedge_after_ms") == 250 and e.get("orphan_grace_secs") == 3600, f"[erasure] hedging/orphans: {e}"
    want = zones.split(",")
    got = [s.get("zone") for s in gw["storage_nodes"]]
    assert got == want, f"zones {got} != {want}"


def all_containers(w: dict) -> list[dict]:
    spec = w["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def main_container(w: dict) -> dict:
    """The workload's service container. The only other one is the
    follow-tls-key sidecar, which must copy the renewed key from the TLS
    Secret's volume into the key volume the service reads."""
    spec = w["spec"]["template"]["spec"]
    name = w["metadata"]["name"]
    others = [c for c in spec["containers"] if c["name"] != "follow-tls-key"]
    assert len(others) == 1, f"{name}: containers {[c['name'] for c in spec['containers']]}"
    (side,) = [c for c in spec["containers"] if c["name"] == "follow-tls-key"]
    mounts = {m["name"]: m for m in side.get("volumeMounts", [])}
    assert mounts.get("pki", {}).get("readOnly") is True, f"{name}: sidecar reads the Secret read-only"
    main_mounts = {m["name"]: m["mountPath"] for m in others[0].get("volumeMounts", [])}
    assert mounts["pki-key"]["mountPath"] == main_mounts.get("pki-key"), f"{name}: sidecar writes the key the service reads"
    assert "tls.key" in side["command"][-1] and "mv -f" in side["command"][-1], f"{name}: sidecar command"
    return others[0]


def check_security(r: Rendered, _arg: str | None) -> None:
    workloads = r.workloads()
    kinds = sorted((w["kind"], w["metadata"]["name"]) for w in workloads)
    n = storage_count(r)
    expected = sorted(
        [("Deployment", "gateway"), ("Deployment", "watermark"), ("Deployment", "segmentation"), ("StatefulSet", "keyserver")]
        + [("StatefulSet", f"storage-{i}") for i in range(1, n + 1)]
    )
    assert kinds == expected, f"workloads {kinds} != {expected}"
    for w in workloads:
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]["spec"]
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot"
        assert int(psc.get("runAsUser", 0)) != 0, f"{name}: pod runAsUser must not be 0"
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp RuntimeDefault"
        assert pod.get("automountServiceAccountToken") is False, f"{name}: no service account token"
        for c in all_containers(w):
            sc = c.get("securityContext", {})
            where = f"{name}/{c['name']}"
            assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert sc.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation false"
            assert sc.get("privileged") is not True, f"{where}: not privileged"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: capabilities drop ALL"
            assert not sc.get("capabilities", {}).get("add"), f"{where}: no added capabilities"
            assert c.get("resources", {}).get("limits", {}).get("memory"), f"{where}: memory limit"


def check_probes(r: Rendered, _arg: str | None) -> None:
    for w in r.workloads():
        name = w["metadata"]["name"]
        main = main_container(w)
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        assert "grpc" in ports, f"{name}: container port named grpc"
        assert ports.get("admin") == int(r.values["admin"]["port"]), f"{name}: container port named admin"
        assert ports["admin"] != ports["grpc"], f"{name}: admin and grpc ports differ"
        # Probes speak plain HTTP to the admin listener, never TLS to grpc.
        want = {"startupProbe": "/live", "readinessProbe": "/ready", "livenessProbe": "/live"}
        for probe, path in want.items():
            p = main.get(probe)
            get = (p or {}).get("httpGet", {})
            assert get.get("port") == "admin" and get.get("path") == path, f"{name}: {probe} is httpGet {path} on admin: {p}"
            assert get.get("scheme", "HTTP") == "HTTP", f"{name}: {probe} plain HTTP"
            assert not {"grpc", "tcpSocket", "exec"} & set(p), f"{name}: {probe} only httpGet"
        svc_port = r.service_port(name)
        svc = r.get("Service", name)
        assert svc["spec"]["ports"][0]["targetPort"] == "grpc", f"Service {name}: targetPort grpc"
        assert svc["spec"]["type"] == "ClusterIP", f"Service {name}: ClusterIP by default"
        sel = svc["spec"]["selector"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in sel.items()), f"Service {name} selects its pods"
        others = [o for o in r.workloads() if o is not w and all(o["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
        assert not others, f"Service {name} also selects {[o['metadata']['name'] for o in others]}"
        _, cfg = r.config_of(w)
        host = r.values["server"]["listenHost"]
        assert cfg["server"]["listen"] == f"{host}:{ports['grpc']}", f"{name}: listen {cfg['server']['listen']!r}"
        assert cfg["admin"]["listen"] == f"{host}:{ports['admin']}", f"{name}: admin.listen {cfg.get('admin')!r}"
        assert svc_port == ports["grpc"], f"{name}: Service port {svc_port} != container port {ports['grpc']}"


def check_addresses(r: Rendered, _arg: str | None) -> None:
    gw = r.configs["gateway-config"]
    wm = r.configs["watermark-config"]
    dials = [gw["keyserver"]["address"], gw["watermark"]["address"], gw["segmentation"]["address"], wm["keyserver"]["address"]]
    dials += [s["address"] for s in gw["storage_nodes"]]
    for a in dials:
        host, _, port = a.rpartition(":")
        assert r.service_port(host) == int(port), f"{a}: Service {host} has another port"
    for name, want in (("keyserver", "keyserver"), ("watermark", "watermark"), ("segmentation", "segmentation")):
        host = gw[name]["address"].rpartition(":")[0]
        assert host == want, f"gateway [{name}] dials {host!r}"
    # Verified peers: every upstream is rendered with the identity it must present.
    td = r.values["access"]["trustDomain"]
    expect = [(f"gateway [{n}]", gw[n].get("identity"), n) for n in ("keyserver", "watermark", "segmentation")]
    expect += [(f"gateway storage_nodes {s['name']}", s.get("identity"), s["name"]) for s in gw["storage_nodes"]]
    expect += [("watermark [keyserver]", wm["keyserver"].get("identity"), "keyserver")]
    for what, got, name in expect:
        assert got == f"spiffe://{td}/service/{name}", f"{what}: identity {got!r}"
    t = gw["upstream_timeouts"]
    ut = r.values["gateway"]["upstreamTimeouts"]
    assert (t["connect_secs"], t["call_secs"], t["stream_secs"]) == (ut["connectSecs"], ut["callSecs"], ut["streamSecs"]), f"gateway [upstream_timeouts] {t}"
    kt = r.values["watermark"]["keyserverTimeouts"]
    assert (wm["keyserver"]["connect_timeout_secs"], wm["keyserver"]["call_timeout_secs"]) == (kt["connectSecs"], kt["callSecs"]), "watermark keyserver timeouts"


def mounts_of(w: dict, container: str, init: bool = False) -> dict[str, dict]:
    spec = w["spec"]["template"]["spec"]
    for c in spec.get("initContainers", []) if init else spec["containers"]:
        if c["name"] == container:
            return {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    raise AssertionError(f"{w['metadata']['name']}: no container {container}")


def volume(w: dict, name: str) -> dict:
    for v in w["spec"]["template"]["spec"]["volumes"]:
        if v["name"] == name:
            return v
    for t in w["spec"].get("volumeClaimTemplates", []):
        if t["metadata"]["name"] == name:
            return {"name": name, "volumeClaimTemplate": t}
    raise AssertionError(f"{w['metadata']['name']}: no volume {name}")


def under(path: str, mounts: dict[str, dict]) -> dict:
    p = PurePosixPath(path)
    hits = [m for mp, m in mounts.items() if p == PurePosixPath(mp) or PurePosixPath(mp) in p.parents]
    assert hits, f"{path} is on no mounted volume"
    return max(hits, key=lambda m: len(m["mountPath"]))


def config_paths(cfg: dict) -> list[tuple[str, str]]:
    """(key, path) of every file or directory a config names."""
    out = []
    for sect in ("server",):
        for k in ("ca", "cert", "key"):
            out.append((f"{sect}.tls.{k}", cfg[sect]["tls"][k]))
    for k in ("ca", "cert", "key"):
        if "client_tls" in cfg:
            out.append((f"client_tls.{k}", cfg["client_tls"][k]))
        if "tls" in cfg.get("keyserver", {}):
            out.append((f"keyserver.tls.{k}", cfg["keyserver"]["tls"][k]))
    ks = cfg.get("keyserver", {})
    if "kek_file" in ks:
        out.append(("keyserver.kek_file", ks["kek_file"]))
        if ks.get("store", {}).get("backend") == "postgres":
            # State and audit chain in an external PostgreSQL: only its
            # connection string, and no redb file.
            assert "db_path" not in ks, "keyserver: db_path beside backend postgres"
            out.append(("keyserver.store.postgres_url_file", ks["store"]["postgres_url_file"]))
        else:
            out.append(("keyserver.db_path", ks["db_path"]))
    if "vault" in cfg:
        out.append(("vault.key_file", cfg["vault"]["key_file"]))
        if cfg["vault"].get("backend") == "postgres":
            # The vault in an external PostgreSQL: only its connection string.
            out.append(("vault.postgres_url_file", cfg["vault"]["postgres_url_file"]))
        else:
            out.append(("vault.path", cfg["vault"]["path"]))
    if "data_dir" in cfg:
        out.append(("data_dir", cfg["data_dir"]))
    return out


def check_paths(r: Rendered, _arg: str | None) -> None:
    """Every path a config names is on the right kind of mounted volume."""
    for w in r.workloads():
        name = w["metadata"]["name"]
        main = main_container(w)
        mounts = mounts_of(w, main["name"])
        cm_name, cfg = r.config_of(w)
        assert main["args"] == ["--config", under_config(mounts, cm_name, w)], f"{name}: --config path"
        for key, path in config_paths(cfg):
            m = under(path, mounts)
            v = volume(w, m["name"])
            where = f"{name}: {key} = {path}"
            if key.rpartition(".")[0] in ("server.tls", "client_tls", "keyserver.tls") and key.endswith(".key") and "emptyDir" in v:
                # The TLS key: copied 0400 by an init container from the
                # Secret into a memory-only emptyDir (services refuse a
                # group-readable key; fsGroup makes Secret files group-readable).
                assert v["emptyDir"].get("medium") == "Memory", f"{where}: key copy not on a memory emptyDir"
                inits = w["spec"]["template"]["spec"].get("initContainers", [])
                copies = [c for c in inits if "0400" in c.get("command", []) and any(a.endswith("/tls.key") for a in c.get("command", []))]
                assert copies, f"{where}: no init container copies tls.key with mode 0400"
                src = copies[0]["command"][-2]
                sm = under(src, mounts_of(w, copies[0]["name"], init=True))
                assert "secret" in volume(w, sm["name"]), f"{where}: the key copy does not come from a Secret"
            elif key.rpartition(".")[0] in ("server.tls", "client_tls", "keyserver.tls"):
                assert "secret" in v, f"{where}: not on a Secret volume"
                items = {i["key"]: i["path"] for i in v["secret"].get("items", [])}
                assert items == {"ca.crt": "ca.crt", "tls.crt": "tls.crt", "tls.key": "tls.key"}, f"{where}: items {items}"
                rel = str(PurePosixPath(path).relative_to(m["mountPath"]))
                assert rel in items.values(), f"{where}: {rel} is not a key of the Secret"
            elif key in ("keyserver.db_path", "vault.path", "data_dir"):
                assert "persistentVolumeClaim" in v or "volumeClaimTemplate" in v, f"{where}: not on a persistent volume"
                assert not m.get("readOnly"), f"{where}: mounted read-only"
            elif key in ("keyserver.kek_file", "keyserver.store.postgres_url_file", "vault.key_file", "vault.postgres_url_file"):
                assert v.get("emptyDir", {}).get("medium") == "Memory", f"{where}: not on a memory emptyDir"
                inits = w["spec"]["template"]["spec"].get("initContainers", [])
                dest = [c for c in inits if path in c.get("command", [])]
                assert dest, f"{where}: no init container writes it"
                cmd = dest[0]["command"]
                assert cmd[:3] == ["install", "-m", "0400"], f"{where}: copied with {cmd}"
            else:
                raise AssertionError(f"{where}: unchecked path key")


def under_config(mounts: dict[str, dict], cm_name: str, w: dict) -> str:
    for mp, m in mounts.items():
        v = volume(w, m["name"])
        if v.get("configMap", {}).get("name") == cm_name:
            return f"{mp}/config.toml"
    raise AssertionError(f"{w['metadata']['name']}: ConfigMap {cm_name} not mounted")


def check_secrets(r: Rendered, _arg: str | None) -> None:
    v = r.values
    want = {"gateway": v["gateway"]["tlsSecret"], "keyserver": v["keyserver"]["tlsSecret"],
            "watermark": v["watermark"]["tlsSecret"], "segmentation": v["segmentation"]["tlsSecret"]}
    for i in range(1, storage_count(r) + 1):
        want[f"storage-{i}"] = v["storage"]["tlsSecretFormat"].replace("%d", str(i))
    for w in r.workloads():
        name = w["metadata"]["name"]
        got = volume(w, "pki")["secret"]["secretName"]
        assert got == want[name], f"{name}: TLS Secret {got!r} != {want[name]!r}"
    ks = r.get("StatefulSet", "keyserver")
    assert volume(ks, "kek")["secret"]["secretName"] == v["keyserver"]["kekSecret"]["name"], "keyserver KEK Secret"
    gw = r.get("Deployment", "gateway")
    assert volume(gw, "vault-key")["secret"]["secretName"] == v["gateway"]["vaultKeySecret"]["name"], "gateway vault key Secret"
    names = [s["metadata"]["name"] for s in r.of_kind("Secret")]
    assert not names, f"the chart must not create Secrets (operator-provided), found {names}"


def check_telemetry(r: Rendered, arg: str | None) -> None:
    want = None if arg in (None, "", "none") else arg
    assert len(r.configs) == 4 + storage_count(r), f"{len(r.configs)} configs"
    for name, cfg in r.configs.items():
        got = cfg.get("telemetry", {}).get("otlp_endpoint")
        assert got == want, f"{name}: otlp_endpoint {got!r} != {want!r}"
        assert cfg["telemetry"]["log"] == r.values["telemetry"]["log"], f"{name}: telemetry.log"


def check_access(r: Rendered, _arg: str | None) -> None:
    a = r.values["access"]
    for name, cfg in r.configs.items():
        acc = cfg["server"]["access"]
        assert acc["trust_domain"] == a["trustDomain"], f"{name}: trust_domain"
        assert acc["dev_roles"] == a["devRoles"], f"{name}: dev_roles"
        assert acc.get("roles", {}) == a["roles"], f"{name}: roles {acc.get('roles')} != {a['roles']}"


def check_notes(r: Rendered, _arg: str | None) -> None:
    for s in ("grpcurl", "-cacert", "-cert", "-key", "grpc.health.v1.Health/Check", " list", "-servername keyserver"):
        assert s in r.notes, f"NOTES.txt lacks {s!r}"
    for i in range(1, storage_count(r) + 1):
        assert f"storage-{i}:" in r.notes, f"NOTES.txt lacks storage-{i}"


def check_dicom(r: Rendered, arg: str | None) -> None:
    """gateway.dicom: [dicom] always (temporal, file_requests), [dicom.scp] +
    container port + Service gateway-dicom + NOTES echoscu exactly when
    scp.enabled (ARG: on / off); with scp.tlsPort also tls_listen, container
    port and gateway-dicom port dicom-tls."""
    assert arg in ("on", "off"), f"dicom check: ARG is on or off, not {arg!r}"
    d = r.values["gateway"]["dicom"]
    scp = d["scp"]
    assert scp["enabled"] is (arg == "on"), f"values: gateway.dicom.scp.enabled is {scp['enabled']}"
    gw = r.configs["gateway-config"]
    assert gw["dicom"]["temporal"] == d["temporal"], f"[dicom] temporal {gw['dicom'].get('temporal')!r}"
    assert gw["dicom"]["file_requests"] is d["fileRequests"], f"[dicom] file_requests {gw['dicom'].get('file_requests')!r}"
    dep = r.get("Deployment", "gateway")
    main = main_container(dep)
    ports = {p["name"]: p for p in main["ports"]}
    grpc_svc = r.get("Service", "gateway")
    assert [p["name"] for p in grpc_svc["spec"]["ports"] if p["name"] != "dicomweb"] == ["grpc"], \
        "Service gateway: grpc (and dicomweb) only"
    ports.pop("dicomweb", None)  # check_dicomweb's
    dicom_ports = [(s["metadata"]["name"], p) for s in r.of_kind("Service") for p in s["spec"]["ports"] if p["name"] == "dicom"]
    if arg == "off":
        assert set(gw["dicom"]) == {"temporal", "file_requests"}, f"[dicom] has {sorted(gw['dicom'])} with the SCP disabled"
        assert sorted(ports) == ["admin", "grpc"], f"gateway container ports {sorted(ports)}"
        assert not dicom_ports, f"a dicom Service port with the SCP disabled: {dicom_ports}"
        assert "echoscu" not in r.notes and "gateway-dicom" not in r.notes, "NOTES.txt mentions the disabled SCP"
        return
    host = r.values["server"]["listenHost"]
    want = {
        "listen": f"{host}:{scp['port']}",
        "ae_title": scp["aeTitle"],
        "allowed_calling_aes": scp["allowedCallingAEs"],
        "owner": scp["owner"],
        "max_associations": scp["maxAssociations"],
        "idle_timeout_secs": scp["idleTimeoutSecs"],
    }
    tls = scp.get("tlsPort")
    if tls is not None:
        want["tls_listen"] = f"{host}:{tls}"
    assert gw["dicom"]["scp"] == want, f"[dicom.scp] {gw['dicom']['scp']} != {want}"
    assert set(gw["dicom"]) == {"temporal", "file_requests", "scp"}, f"[dicom] keys {sorted(gw['dicom'])}"
    want_ports = ["admin", "dicom"] + (["dicom-tls"] if tls is not None else []) + ["grpc"]
    assert sorted(ports) == want_ports, f"gateway container ports {sorted(ports)}"
    if tls is not None:
        assert ports["dicom-tls"]["containerPort"] == tls and ports["dicom-tls"].get("protocol") == "TCP", \
            f"container port dicom-tls {ports['dicom-tls']}"
    assert ports["dicom"]["containerPort"] == scp["port"], f"container port dicom {ports['dicom']}"
    assert ports["dicom"].get("protocol") == "TCP", "container port dicom: TCP"
    assert [n for n, _ in dicom_ports] == ["gateway-dicom"], f"dicom Service ports {dicom_ports}"
    svc = r.get("Service", "gateway-dicom")
    svc_ports = {q["name"]: q for q in svc["spec"]["ports"]}
    assert sorted(svc_ports) == ["dicom"] + (["dicom-tls"] if tls is not None else []), f"gateway-dicom ports {sorted(svc_ports)}"
    if tls is not None:
        q = svc_ports["dicom-tls"]
        assert q["port"] == tls and q["targetPort"] == "dicom-tls" and q.get("protocol") == "TCP", f"gateway-dicom port {q}"
    p = svc_ports["dicom"]
    assert p["port"] == scp["port"] and p["targetPort"] == "dicom", f"gateway-dicom port {p}"
    assert p.get("protocol") == "TCP" and p.get("appProtocol") not in (None, "grpc"), f"gateway-dicom appProtocol {p}"
    assert svc["spec"]["type"] == scp["service"]["type"], f"gateway-dicom type {svc['spec']['type']}"
    assert (svc["metadata"].get("annotations") or {}) == scp["service"]["annotations"], "gateway-dicom annotations"
    ranges = scp["service"].get("loadBalancerSourceRanges") or []
    assert (svc["spec"].get("loadBalancerSourceRanges") or []) == ranges, "gateway-dicom loadBalancerSourceRanges"
    sel = svc["spec"]["selector"]
    picked = [w["metadata"]["name"] for w in r.workloads() if all(w["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items())]
    assert picked == ["gateway"], f"gateway-dicom selects {picked}"
    assert sel == grpc_svc["spec"]["selector"], "gateway-dicom and gateway select the same pod"
    # The echoscu line in NOTES.txt, as the shell would split it.
    lines = [l for l in r.notes.splitlines() if l.strip().startswith("echoscu ")]
    assert len(lines) == 1, f"NOTES.txt: {len(lines)} echoscu lines"
    argv = shlex.split(lines[0])
    opt = {argv[i]: argv[i + 1] for i in range(1, len(argv) - 1) if argv[i].startswith("-a")}
    assert opt.get("-aec") == scp["aeTitle"], f"NOTES.txt echoscu -aec {opt.get('-aec')!r}"
    assert opt.get("-aet") in scp["allowedCallingAEs"], f"NOTES.txt echoscu -aet {opt.get('-aet')!r}"
    assert argv[-2:] == ["localhost", str(scp["port"])], f"NOTES.txt echoscu peer {argv[-2:]}"
    fwd = f"port-forward svc/gateway-dicom {scp['port']}:{scp['port']}"
    assert fwd in r.notes, f"NOTES.txt lacks {fwd!r}"


def check_dicomweb(r: Rendered, arg: str | None) -> None:
    """gateway.dicomweb: [dicomweb] + container port + port `dicomweb` of
    Service gateway exactly when enabled (ARG: on / off)."""
    assert arg in ("on", "off"), f"dicomweb check: ARG is on or off, not {arg!r}"
    w = r.values["gateway"]["dicomweb"]
    assert w["enabled"] is (arg == "on"), f"values: gateway.dicomweb.enabled is {w['enabled']}"
    gw = r.configs["gateway-config"]
    ports = {p["name"]: p for p in main_container(r.get("Deployment", "gateway"))["ports"]}
    svc_ports = {p["name"]: p for p in r.get("Service", "gateway")["spec"]["ports"]}
    assert ("DICOMweb" in r.notes) is (arg == "on"), f"NOTES.txt and gateway.dicomweb.enabled ({arg}) disagree"
    if arg == "off":
        assert "dicomweb" not in gw, "[dicomweb] rendered while disabled"
        assert "dicomweb" not in ports and "dicomweb" not in svc_ports, "a dicomweb port while disabled"
        return
    want = {"listen": f"{r.values['server']['listenHost']}:{w['port']}", "max_request_bytes": w["maxRequestBytes"]}
    assert gw["dicomweb"] == want, f"[dicomweb] {gw['dicomweb']} != {want}"
    assert ports["dicomweb"]["containerPort"] == w["port"], f"container port dicomweb {ports['dicomweb']}"
    p = svc_ports["dicomweb"]
    assert (p["port"], p["targetPort"], p.get("appProtocol")) == (w["port"], "dicomweb", "https"), f"Service gateway port {p}"


def check_checksums(r: Rendered, _arg: str | None) -> None:
    seen = set()
    for w in r.workloads():
        ann = w["spec"]["template"]["metadata"].get("annotations", {})
        sum_ = ann.get("checksum/config", "")
        assert re.fullmatch(r"[0-9a-f]{64}", sum_), f"{w['metadata']['name']}: checksum/config annotation"
        seen.add(sum_)
    assert len(seen) == len(r.workloads()), "every workload has its own config checksum"


# Kubernetes release whose OpenAPI schemas every manifest must satisfy
# (kubernetes-validate bundles them; strict: unknown fields are errors).
K8S_VERSION = "1.33.0"

# Custom resources the chart may render (no schema bundled for them): each
# is checked by hand below, and any other kind without a schema fails.
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("cert-manager.io/v1", "Certificate")}


def check_schemas(r: Rendered, _arg: str | None) -> None:
    import kubernetes_validate as kv

    problems = []
    for o in r.objects:
        kind = (o.get("apiVersion"), o.get("kind"))
        name = o.get("metadata", {}).get("name")
        if kind in CRD_KINDS:
            check_crd(o)
            continue
        try:
            kv.validate(o, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            problems.append(f"{kind[1]} {name}: {e.message} at {list(e.path)}")
        except kv.SchemaNotFoundError:
            problems.append(f"{kind[1]} {name}: no Kubernetes {K8S_VERSION} schema for {kind[0]}")
    assert not problems, "\n".join(problems)


def check_crd(o: dict) -> None:
    name = o["metadata"]["name"]
    if o["kind"] == "Certificate":
        spec = o["spec"]
        allowed = {"secretName", "commonName", "uris", "dnsNames", "duration", "renewBefore",
                   "privateKey", "usages", "issuerRef"}
        assert set(spec) == allowed, f"Certificate {name}: {sorted(spec)}"
        assert spec["privateKey"] == {"algorithm": "ECDSA", "size": 256, "encoding": "PKCS8",
                                      "rotationPolicy": "Always"}, spec["privateKey"]
        assert set(spec["usages"]) == {"digital signature", "server auth", "client auth"}, spec["usages"]
        assert spec["issuerRef"]["group"] == "cert-manager.io" and spec["issuerRef"]["kind"] in ("Issuer", "ClusterIssuer")
        for d in ("duration", "renewBefore"):
            assert re.fullmatch(r"[0-9]+(h|m|s)", spec[d]), spec[d]
    if o["kind"] == "PodMonitor":
        spec = o["spec"]
        assert set(spec) == {"selector", "podMetricsEndpoints"}, f"PodMonitor {name}: {sorted(spec)}"
        labels = spec["selector"]["matchLabels"]
        assert labels.get("app.kubernetes.io/name") == "tessera", labels
        for ep in spec["podMetricsEndpoints"]:
            assert ep["port"] == "admin" and ep["path"] == "/metrics", ep
            assert re.fullmatch(r"[0-9]+(ms|s|m|h)", ep["interval"]), ep


def peers_of(rule: dict) -> set[str]:
    """The sources of one ingress rule: components, CIDRs, or '*' (anyone)."""
    if "from" not in rule:
        return {"*"}
    out = set()
    for p in rule["from"]:
        if "ipBlock" in p:
            out.add("cidr:" + p["ipBlock"]["cidr"])
        elif "podSelector" in p and "namespaceSelector" not in p:
            comp = p["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/component")
            out.add(comp or "pods:" + json.dumps(p["podSelector"], sort_keys=True))
        else:
            out.add("peer:" + json.dumps(p, sort_keys=True))
    return out


def check_network_policies(r: Rendered, arg: str | None) -> None:
    """The trust zones: who may reach each component's gRPC, DICOM and admin port."""
    v = r.values
    np = v["networkPolicy"]
    pols = {p["metadata"]["name"]: p for p in r.of_kind("NetworkPolicy")}
    if arg == "off":
        assert not pols, sorted(pols)
        return
    ports = {c: int(v[c]["port"]) for c in ("gateway", "keyserver", "watermark", "segmentation", "storage")}
    users = peers_of({"from": np["usersFrom"]}) if np["usersFrom"] else {"*"}
    want = {
        "gateway": users,
        "keyserver": users if users == {"*"} else {"gateway", "watermark"} | users,
        # Nothing but the gateway reaches these, whatever usersFrom says.
        "watermark": {"gateway"},
        "segmentation": {"gateway"},
        "storage": {"gateway"},
    }
    admin_from = peers_of({"from": np["adminFrom"]}) if np["adminFrom"] else {"*"}
    assert set(pols) == {f"tessera-{c}" for c in ports}, sorted(pols)
    admin = int(v["admin"]["port"])
    scp = v["gateway"].get("dicom", {}).get("scp", {})
    for comp, port in ports.items():
        spec = pols[f"tessera-{comp}"]["spec"]
        assert spec["policyTypes"] == ["Ingress"], spec
        sel = spec["podSelector"]["matchLabels"]
        assert sel["app.kubernetes.io/component"] == comp and sel["app.kubernetes.io/instance"] == "tessera", sel
        by_port: dict[int, set[str]] = {}
        for rule in spec["ingress"]:
            for p in rule["ports"]:
                by_port.setdefault(int(p["port"]), set()).update(peers_of(rule))
        got = by_port.pop(port, set())
        assert got == want[comp], f"{comp} gRPC port {port}: from {sorted(got)}, expected {sorted(want[comp])}"
        web = v["gateway"].get("dicomweb", {})
        if comp == "gateway" and web.get("enabled"):
            got = by_port.pop(int(web["port"]), set())
            assert got == users, f"DICOMweb port {web['port']}: from {sorted(got)}, expected {sorted(users)}"
        got = by_port.pop(admin, set())
        assert got == admin_from, f"{comp} admin port: from {sorted(got)}"
        if comp == "gateway" and scp.get("enabled") and np["dicomCIDRs"]:
            for dport in [scp["port"]] + ([scp["tlsPort"]] if scp.get("tlsPort") is not None else []):
                got = by_port.pop(int(dport), set())
                assert got == {"cidr:" + c for c in np["dicomCIDRs"]}, f"DICOM port {dport} from {sorted(got)}"
        assert not by_port, f"{comp}: ports open beyond the trust zones: {by_port}"
    # The workloads the policies select are the chart's own.
    for w in r.workloads():
        comp = w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        assert f"tessera-{comp}" in pols, f"{w['metadata']['name']}: no NetworkPolicy"


def check_certificates(r: Rendered, arg: str | None) -> None:
    """`off`, or `on`: one Certificate per service into the Secret it mounts,
    with its SPIFFE URI SAN and the Service DNS names."""
    certs = {c["spec"]["secretName"]: c for c in r.of_kind("Certificate")}
    if arg == "off":
        assert not certs, sorted(certs)
        return
    td = r.values["access"]["trustDomain"]
    mounted = {}
    for w in r.workloads():
        name = w["metadata"]["name"]
        for vol in w["spec"]["template"]["spec"]["volumes"]:
            secret = vol.get("secret", {}).get("secretName", "")
            if secret in certs:
                mounted[secret] = name
    assert set(mounted) == set(certs), f"Certificates {sorted(certs)} vs mounted {sorted(mounted)}"
    for secret, svc in mounted.items():
        spec = certs[secret]["spec"]
        assert spec["uris"] == [f"spiffe://{td}/service/{svc}"], spec["uris"]
        assert spec["dnsNames"] == [svc, f"{svc}.tessera.svc", f"{svc}.tessera.svc.cluster.local"], spec["dnsNames"]
        r.get("Service", svc)


def check_disruption_budgets(r: Rendered, _arg: str | None) -> None:
    v = r.values
    pdbs = {p["metadata"]["name"]: p for p in r.of_kind("PodDisruptionBudget")}
    if not v["podDisruptionBudget"]["enabled"]:
        assert not pdbs, sorted(pdbs)
        return
    ec = v["storage"]["erasure"]
    want = {
        "tessera-storage": int(ec["parity"]) if ec["enabled"] else 1,
        "tessera-watermark": 1,
        "tessera-segmentation": 1,
    }
    assert {n: p["spec"]["maxUnavailable"] for n, p in pdbs.items()} == want, pdbs
    for n, p in pdbs.items():
        comp = n.removeprefix("tessera-")
        sel = p["spec"]["selector"]["matchLabels"]
        matched = [
            w for w in r.workloads()
            if all(w["spec"]["template"]["metadata"]["labels"].get(k) == val for k, val in sel.items())
        ]
        assert matched and all(
            w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == comp for w in matched
        ), f"{n} selects {[w['metadata']['name'] for w in matched]}"


def check_spread(r: Rendered, arg: str | None) -> None:
    """Load spread (issue 20): the watermark and segmentation Services are
    headless and the gateway balances over their addresses (resolve_secs);
    `default`: 2+ replicas each, both under a PodDisruptionBudget."""
    gw = r.configs["gateway-config"]
    resolve = int(r.values["gateway"]["upstreamResolveSecs"])
    for name in ("keyserver", "watermark", "segmentation"):
        assert gw[name].get("resolve_secs") == resolve, f"gateway [{name}] resolve_secs {gw[name].get('resolve_secs')}"
    for name in ("watermark", "segmentation"):
        spec = r.get("Service", name)["spec"]
        assert spec.get("clusterIP") == "None" and spec["type"] == "ClusterIP", f"Service {name} not headless: {spec}"
        replicas = r.get("Deployment", name)["spec"]["replicas"]
        assert replicas == int(r.values[name]["replicas"]), f"{name}: {replicas} replicas"
        if arg == "default":
            assert replicas >= 2 and resolve > 0, f"{name}: {replicas} replicas, resolve_secs {resolve}"
            assert r.get("PodDisruptionBudget", f"tessera-{name}")["spec"]["maxUnavailable"] == 1
    # The keyserver's replicas (on PostgreSQL) are balanced the same way
    # when its Service is in-cluster only.
    ks = r.values["keyserver"]
    spec = r.get("Service", "keyserver")["spec"]
    wm = r.configs["watermark-config"]["keyserver"].get("resolve_secs")
    if ks["store"]["backend"] == "postgres" and ks["service"]["type"] == "ClusterIP":
        assert spec.get("clusterIP") == "None", f"Service keyserver not headless beside {ks['store']['replicas']} replicas: {spec}"
        # The watermark service derives keys there too: it balances as well.
        assert wm == resolve, f"watermark [keyserver] resolve_secs {wm}, the gateway's {resolve}"
    else:
        assert spec.get("clusterIP") != "None", f"Service keyserver headless: {spec}"
        assert wm == 0, f"watermark [keyserver] resolve_secs {wm} without keyserver replicas"


MEM_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def mem_bytes(q: str) -> int:
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, f"memory quantity {q!r}"
    return int(m.group(1)) * MEM_UNITS.get(m.group(2) or "", 1)


def check_storage_memory(r: Rendered, _arg: str | None) -> None:
    """Every storage node's buffered uploads (max_concurrent_puts x
    max_object_bytes) plus its 256 MiB reserve fit its container's memory
    limit, and the cap is what gateway.maxImageBytes needs."""
    nodes = [w for w in r.of_kind("StatefulSet") if w["metadata"]["name"].startswith("storage-")]
    assert nodes, "no storage StatefulSet"
    for w in nodes:
        name = w["metadata"]["name"]
        _, cfg = r.config_of(w)
        limit = main_container(w).get("resources", {}).get("limits", {}).get("memory")
        assert limit, f"{name}: no memory limit"
        need = cfg["max_concurrent_puts"] * cfg["max_object_bytes"] + 256 * 2**20
        assert 1 <= cfg["max_concurrent_puts"] <= 1024, f"{name}: puts {cfg['max_concurrent_puts']}"
        assert need <= mem_bytes(limit), (
            f"{name}: {cfg['max_concurrent_puts']} puts x {cfg['max_object_bytes']} B + 256 MiB = {need} B > limit {limit}"
        )


CHECKS = {
    "schemas": check_schemas,
    "network-policies": check_network_policies,
    "disruption-budgets": check_disruption_budgets,
    "certificates": check_certificates,
    "storage-nodes": check_storage_nodes,
    "erasure": check_erasure,
    "security": check_security,
    "probes": check_probes,
    "addresses": check_addresses,
    "paths": check_paths,
    "secrets": check_secrets,
    "telemetry": check_telemetry,
    "access": check_access,
    "notes": check_notes,
    "checksums": check_checksums,
    "dicom": check_dicom,
    "dicomweb": check_dicomweb,
    "spread": check_spread,
    "storage-memory": check_storage_memory,
}


def cmd_gateway_nodes_override(out: str, addrs: list[str]) -> None:
    gw = Rendered(out).configs["gateway-config"]
    names = [s["name"] for s in gw["storage_nodes"]]
    if len(names) != len(addrs):
        raise SystemExit(f"{len(names)} storage nodes rendered, {len(addrs)} addresses given")
    ids = [s.get("identity") for s in gw["storage_nodes"]]
    print("[" + ", ".join(
        f'{{name = {json.dumps(n)}, address = {json.dumps(a)}'
        + (f', identity = {json.dumps(i)}' if i else "")
        + "}"
        for n, a, i in zip(names, addrs, ids)) + "]")


def cmd_gateway_scp(out: str) -> None:
    """The rendered [dicom.scp]: called AE title, then each calling AE title, one a line."""
    scp = Rendered(out).configs["gateway-config"]["dicom"]["scp"]
    print("\n".join([scp["ae_title"], *scp["allowed_calling_aes"]]))


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "prepare" and len(args) == 3:
        cmd_prepare(*args)
    elif cmd == "lint" and len(args) == 1:
        return cmd_lint(args[0])
    elif cmd == "diagnose" and len(args) == 1:
        cmd_diagnose(args[0])
    elif cmd == "render" and len(args) in (2, 3):
        cmd_render(args[0], args[1], args[2] if len(args) == 3 else None)
    elif cmd == "check" and len(args) in (2, 3) and args[0] in CHECKS:
        try:
            CHECKS[args[0]](Rendered(args[1]), args[2] if len(args) == 3 else None)
        except (AssertionError, KeyError) as e:
            print(f"{args[0]}: {type(e).__name__}: {e}")
            return 1
    elif cmd == "k8s-version" and not args:
        print(K8S_VERSION)
    elif cmd == "gateway-scp" and len(args) == 1:
        cmd_gateway_scp(args[0])
    elif cmd == "gateway-nodes-override" and len(args) >= 2:
        cmd_gateway_nodes_override(args[0], args[1:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
