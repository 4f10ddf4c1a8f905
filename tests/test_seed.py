"""The NoCloud seed: meta-data and user-data golden values, the --cloud-init merge rules and
hostile user files (pure), the ISO read back with pycdlib and the host's blkid, the login keys
(made once under concurrency), and what `run` does with all of it (dry runs)."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pycdlib
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conftest import Cli, InProcessCli
from egpu.errors import UsageError
from egpu.images import seed
from egpu.images.seed import SeedMount, SeedSpec
from egpu.images.seed_iso import iso_name, seed_iso_bytes, write_seed_iso
from egpu.vm import lifecycle, sshkeys, store

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB jane@host"
SPEC = SeedSpec(hostname="web1", instance_id="iid-egpu-0123", user="jane", public_keys=(KEY,),
                mounts=(SeedMount("home", "/mnt/home", readonly=True),))

GOLDEN_META = "instance-id: iid-egpu-0123\nlocal-hostname: web1\n"
GOLDEN_USER = f"""#cloud-config
hostname: web1
users:
- default
- name: jane
  gecos: egpu login user
  shell: /bin/bash
  sudo: ALL=(ALL) NOPASSWD:ALL
  lock_passwd: true
  ssh_authorized_keys:
  - {KEY}
ssh_authorized_keys:
- {KEY}
ssh_pwauth: false
runcmd:
- - sh
  - -c
  - systemctl enable --now qemu-guest-agent 2>/dev/null || true
mounts:
- - home
  - /mnt/home
  - 9p
  - trans=virtio,version=9p2000.L,ro
  - '0'
  - '0'
"""

@pytest.fixture
def cli(inproc: InProcessCli) -> Cli:
    """What these commands decide and print is tested in-process (quick; see InProcessCli)."""
    return inproc



def user_doc(text: str) -> dict[str, Any]:
    assert text.startswith(seed.CLOUD_CONFIG_HEADER + "\n")
    doc = yaml.safe_load(text)
    assert isinstance(doc, dict)
    return doc


# --- meta-data and user-data ---------------------------------------------------------------

def test_meta_data_golden() -> None:
    assert seed.meta_data(SPEC) == GOLDEN_META


def test_user_data_golden() -> None:
    assert seed.user_data(SPEC) == GOLDEN_USER


def test_writable_mount_has_no_ro() -> None:
    assert SeedMount("data", "/srv/data").fstab_entry() == [
        "data", "/srv/data", "9p", "trans=virtio,version=9p2000.L", "0", "0"]


@pytest.mark.parametrize("mount", [
    SeedMount("a b", "/x"), SeedMount("", "/x"), SeedMount("t" * 32, "/x"),
    SeedMount("tag", "relative"), SeedMount("tag", "/a b"), SeedMount("tag", "/a/../etc"),
    SeedMount("tag", "/x,rw"),
])
def test_bad_mounts_are_refused(mount: SeedMount) -> None:
    with pytest.raises(UsageError):
        mount.fstab_entry()


@pytest.mark.parametrize("name", ["web1", "a", "my-vm.lab", "A9", "x" * 63])
def test_hostnames_taken(name: str) -> None:
    assert seed.check_hostname(name) == name


@pytest.mark.parametrize("name", ["my_vm", "-vm", "vm-", "a..b", "x" * 64, "", "a.-b"])
def test_hostnames_refused(name: str) -> None:
    with pytest.raises(UsageError, match="not a valid host name"):
        seed.check_hostname(name)


@given(st.from_regex(store.NAME_RE, fullmatch=True))
def test_every_vm_name_is_taken_or_refused_with_usage_error(name: str) -> None:
    try:
        host = seed.check_hostname(name)
    except UsageError:
        assert "_" in name or "-." in name or ".-" in name or name.endswith(("-", ".")) \
            or ".." in name or len(name.split(".", 1)[0]) > 63
        return
    # read back as the same string, even where YAML would see a number ("0") or a bool ("no")
    meta = yaml.safe_load(seed.meta_data(SeedSpec(host, "iid", "u", (KEY,))))
    assert meta == {"instance-id": "iid", "local-hostname": host}


@pytest.mark.parametrize(("host_user", "login"), [
    ("jane", "jane"), ("dev_1", "dev_1"), ("root", "egpu"), ("Jane", "egpu"), (None, "egpu"),
    ("", "egpu"), ("-x", "egpu"), ("a" * 33, "egpu"), ("nobody", "egpu"), ("1abc", "egpu"),
])
def test_login_user(host_user: str | None, login: str) -> None:
    assert seed.login_user(host_user) == login


@given(st.text(max_size=40))
def test_login_user_is_always_a_plain_user_name(host_user: str) -> None:
    login = seed.login_user(host_user)
    assert login == host_user or login == seed.FALLBACK_USER
    lifecycle.check_ssh_user(login)  # ssh takes it as a user, never as an option


def test_instance_ids_are_unique() -> None:
    ids = {seed.new_instance_id() for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith(seed.INSTANCE_ID_PREFIX) for i in ids)


@pytest.mark.parametrize("keys", [(), ("not a key",), (KEY + "\nssh-rsa AAAA x",),
                                  ("ssh-ed25519 " + "A" * 20000,), (KEY,) * 65])
def test_bad_public_keys_refused(keys: tuple[str, ...]) -> None:
    with pytest.raises(UsageError):
        seed.check_public_keys(keys)


# --- the --cloud-init merge ----------------------------------------------------------------

def test_merge_rules() -> None:
    theirs = {"hostname": "evil", "packages": ["htop"], "runcmd": ["echo hi"],
              "users": [{"name": "bob"}], "ssh_authorized_keys": ["ssh-rsa AAAA bob"],
              "ssh_pwauth": True, "timezone": "Europe/Paris"}
    merged = seed.merge_user_data(seed.egpu_user_data(SPEC), theirs)
    ours = seed.egpu_user_data(SPEC)
    assert list(merged)[:len(ours)] == list(ours)  # egpu's keys first, in its order
    assert merged["hostname"] == "web1"  # never the user's
    assert merged["users"] == [*ours["users"], {"name": "bob"}]
    assert merged["ssh_authorized_keys"] == [KEY, "ssh-rsa AAAA bob"]
    assert merged["runcmd"] == [*ours["runcmd"], "echo hi"]
    assert merged["packages"] == ["htop"]
    assert merged["ssh_pwauth"] is True  # the user's scalar wins
    assert list(merged)[-1] == "timezone"


@pytest.mark.parametrize("key", seed.APPEND_KEYS)
def test_merge_refuses_a_non_list_for_a_list_key(key: str) -> None:
    with pytest.raises(UsageError, match=f"{key} must be a list"):
        seed.merge_user_data(seed.egpu_user_data(SPEC), {key: "x"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                max_size=3),
    max_leaves=10)


@given(st.dictionaries(st.text(min_size=1, max_size=12) | st.sampled_from(
    [*seed.APPEND_KEYS, "hostname", "ssh_pwauth"]), json_values, max_size=6))
def test_merge_properties(theirs: dict[str, Any]) -> None:
    ours = seed.egpu_user_data(SPEC)
    try:
        merged = seed.merge_user_data(ours, theirs)
    except UsageError:
        assert any(k in seed.APPEND_KEYS and not isinstance(v, list) for k, v in theirs.items())
        return
    assert list(merged)[:len(ours)] == list(ours)
    assert merged["hostname"] == SPEC.hostname
    for key, value in theirs.items():
        if key in seed.APPEND_KEYS:
            assert merged[key] == [*ours.get(key, []), *value]
        elif key != "hostname":
            assert merged[key] == value
    # and it is written as a #cloud-config that reads back as the merge
    text = seed.user_data(SeedSpec(**{**SPEC.__dict__, "user_data": theirs}))
    assert user_doc(text) == merged


# --- hostile --cloud-init files ------------------------------------------------------------

@pytest.mark.parametrize(("data", "why"), [
    (b"#include\nhttp://example.invalid/x\n", "first line must be '#cloud-config'"),
    (b"#!/bin/sh\nrm -rf /\n", "first line must be '#cloud-config'"),
    (b"Content-Type: multipart/mixed\n", "first line must be '#cloud-config'"),
    (b"## template: jinja\n#cloud-config\n", "first line must be '#cloud-config'"),
    (b"packages: [htop]\n", "first line must be '#cloud-config'"),
    (b"", "first line must be '#cloud-config'"),
    (b"#cloud-config\n- a\n- b\n", "a mapping, not a list"),
    (b"#cloud-config\njust text\n", "a mapping, not a str"),
    (b"#cloud-config\nkey: [unclosed\n", "not valid YAML at line"),
    (b"#cloud-config\na: b\n\tc: d\n", "not valid YAML"),
    (b"#cloud-config\n!!python/object:os.system {}\n", "not valid YAML"),
    (b"#cloud-config\n" + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
    (b"#cloud-config\n? [1, 2]\n: x\n", "not valid YAML"),  # an unhashable key
    (b"#cloud-config\n1: x\n", "is not a string"),
    (b"#cloud-config\nx: \xff\xfe\n", "not UTF-8"),
    (b"#cloud-config\n?\n", "key None is not a string"),
    (b"#cloud-config\n" + b"a: " + b"x" * seed.MAX_USER_DATA_BYTES + b"\n", "larger than"),
])
def test_hostile_user_files_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(UsageError, match=why.replace("[", r"\[")) as e:
        seed.parse_user_cloud_config(data, "f.yaml")
    assert "\n" not in str(e.value)


def test_plain_cloud_config_is_taken() -> None:
    assert seed.parse_user_cloud_config(b"#cloud-config\npackages: [htop]\n", "f") == {
        "packages": ["htop"]}
    assert seed.parse_user_cloud_config(b"#cloud-config\n", "f") == {}
    assert seed.parse_user_cloud_config(b"\xef\xbb\xbf#cloud-config \r\na: 1\r\n", "f") == {"a": 1}


@given(st.binary(max_size=300))
def test_any_bytes_give_a_mapping_or_usage_error(tail: bytes) -> None:
    try:
        doc = seed.parse_user_cloud_config(b"#cloud-config\n" + tail, "f")
    except UsageError:
        return
    assert isinstance(doc, dict) and all(isinstance(k, str) for k in doc)


def test_alias_bomb_stays_small() -> None:
    # anchors are written back as anchors: the seed stays the size of the file
    lines = ["#cloud-config", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    doc = seed.parse_user_cloud_config("\n".join(lines).encode(), "f")
    assert len(seed.user_data(SeedSpec(**{**SPEC.__dict__, "user_data": doc}))) < 8192


# --- the ISO -------------------------------------------------------------------------------

def test_iso_names() -> None:
    assert iso_name("user-data") == "/USERDATA.;1"
    assert iso_name("meta-data") == "/METADATA.;1"
    assert iso_name("network-config") == "/NETWORKC.;1"


def read_iso(data: bytes) -> tuple[pycdlib.PyCdlib, dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    files = {}
    for child in iso.list_children(rr_path="/"):
        name = child.rock_ridge.name().decode()
        if name in (".", ".."):
            continue
        out = io.BytesIO()
        iso.get_file_from_iso_fp(out, rr_path=f"/{name}")
        files[name] = out.getvalue()
    return iso, files


def test_iso_reads_back_with_rock_ridge_and_joliet_names() -> None:
    files = seed.seed_files(SPEC)
    iso, found = read_iso(seed_iso_bytes(files))
    try:
        assert found == files
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"cidata"
        assert iso.has_rock_ridge() and iso.has_joliet()
        for name, data in files.items():
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, joliet_path=f"/{name}")
            assert out.getvalue() == data
    finally:
        iso.close()


def test_colliding_iso_names_are_refused() -> None:
    with pytest.raises(ValueError, match="collide"):
        seed_iso_bytes({"user-data": b"", "userdata": b""})


def test_blkid_sees_the_cidata_label(tmp_path: Path) -> None:
    out = tmp_path / "seed.iso"
    write_seed_iso(out, seed.seed_files(SPEC))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    probe = subprocess.run(["blkid", "-p", "-o", "export", str(out)], capture_output=True,
                           text=True, check=True).stdout.splitlines()
    assert "LABEL=cidata" in probe and "TYPE=iso9660" in probe
    assert [p.name for p in tmp_path.iterdir()] == ["seed.iso"]  # no temp file left


# --- login keys ----------------------------------------------------------------------------

def keygen(path: Path, kind: str = "ed25519") -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", path.name, "-f", str(path)],
                   check=True)
    return path.with_name(path.name + ".pub").read_text().strip()


def test_user_keys_preferred_order_and_all_authorized(tmp_path: Path) -> None:
    ssh = tmp_path / ".ssh"
    ssh.mkdir()
    rsa = keygen(ssh / "id_rsa", "rsa")
    other = keygen(ssh / "work")
    ecdsa = keygen(ssh / "id_ecdsa", "ecdsa")
    (ssh / "id_ecdsa").unlink()  # a .pub without its private half is authorized, not passed
    (ssh / "junk.pub").write_text("not a key\n")
    keys = sshkeys.login_keys(ssh, tmp_path / "egpu")
    assert keys.private == ssh / "id_rsa"
    assert keys.public_keys == (ecdsa, rsa, other)
    assert not (tmp_path / "egpu").exists()  # nothing generated


def test_generated_key_when_the_user_has_none(tmp_path: Path) -> None:
    keys = sshkeys.login_keys(tmp_path / "no-ssh", tmp_path / "egpu")
    assert keys.private == tmp_path / "egpu" / "id_ed25519"
    assert stat.S_IMODE(keys.private.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "egpu").stat().st_mode) == 0o700
    pub = (tmp_path / "egpu" / "id_ed25519.pub").read_text().strip()
    assert keys.public_keys == (pub,)
    again = sshkeys.login_keys(tmp_path / "no-ssh", tmp_path / "egpu")
    assert again == keys  # once per user: the same key next time


def test_key_made_once_under_concurrency(tmp_path: Path) -> None:
    key_dir = tmp_path / "egpu"
    code = ("import sys; from pathlib import Path; from egpu.vm.sshkeys import "
            "ensure_generated_key as g; p = g(Path(sys.argv[1])); "
            "print(p.with_name(p.name + '.pub').read_text().strip())")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(key_dir)],
                              stdout=subprocess.PIPE, text=True) for _ in range(6)]
    outs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outs) == 1 and outs.pop().startswith("ssh-ed25519 ")
    assert sorted(os.listdir(key_dir)) == [".keygen.lock", "id_ed25519", "id_ed25519.pub"]


# --- egpu ssh ------------------------------------------------------------------------------

def config(**fields: Any) -> store.VmConfig:
    return store.VmConfig(name="vm", arch="aarch64", cpus=1, memory_mib=512, accel="tcg",
                          gpu_path="none", qemu="q", qemu_version="11", argv=["q"], **fields)


def test_ssh_login_of_a_seeded_vm(tmp_path: Path) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("k")
    vm = store.VmDir("vm", root=tmp_path)
    user, got_key, hosts = lifecycle.ssh_login(vm, config(ssh_user="jane", ssh_key=str(key)),
                                               None)
    assert (user, got_key, hosts) == ("jane", key, vm.file(store.KNOWN_HOSTS))
    argv = lifecycle.ssh_argv(2222, user, ["id"], key=got_key, known_hosts=hosts)
    assert argv == ["ssh", "-p", "2222", "-i", str(key), "-o", "IdentitiesOnly=yes",
                    "-o", "StrictHostKeyChecking=accept-new",
                    "-o", f"UserKnownHostsFile={vm.path}/known_hosts",
                    "-o", "LogLevel=ERROR", "jane@127.0.0.1", "id"]
    assert lifecycle.ssh_login(vm, config(ssh_user="jane"), "bob")[0] == "bob"  # --user wins


def test_ssh_login_of_an_unseeded_vm(tmp_path: Path) -> None:
    vm = store.VmDir("vm", root=tmp_path)
    assert lifecycle.ssh_login(vm, config(), None) == (lifecycle.DEFAULT_SSH_USER, None, None)
    # a recorded key that is gone is not passed
    assert lifecycle.ssh_login(vm, config(ssh_user="u", ssh_key=str(tmp_path / "x")),
                               None)[1] is None


def test_ssh_refuses_known_hosts_paths_ssh_would_split(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot pass this path"):
        lifecycle.ssh_argv(2222, "u", known_hosts=tmp_path / "a b" / "known_hosts")


# --- run --------------------------------------------------------------------------------------

def seed_drive(argv: list[str]) -> list[str]:
    return [a for a in argv if "id=seed" in a or a.endswith("drive=seed")]


def test_dry_run_base_shows_the_seed_disk(cli: Cli, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    base.touch()
    argv = cli.json("run", "--dry-run", "--json", "--name", "web1", "--base", str(base),
                    "--gpu", "none")["argv"]
    iso = cli.home / "data/vms/web1/seed.iso"
    assert seed_drive(argv) == [f"file={iso},format=raw,if=none,id=seed,readonly=on",
                                "virtio-blk-pci,drive=seed"]
    # the boot disk keeps bootindex 0; the seed has none
    assert "virtio-blk-pci,drive=disk0,bootindex=0" in argv
    assert not (cli.home / "data/vms/web1").exists()  # a dry run writes nothing
    assert not (cli.home / "data/ssh").exists()


def test_dry_run_without_seed(cli: Cli, tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    base.touch()
    argv = cli.json("run", "--dry-run", "--json", "--base", str(base), "--gpu", "none",
                    "--no-seed")["argv"]
    assert seed_drive(argv) == []
    builtin = cli.json("run", "--dry-run", "--json", "--gpu", "none")["argv"]
    assert seed_drive(builtin) == []  # the built-in guest has no cloud-init


@pytest.mark.parametrize(("args", "why"), [
    (["--cloud-init", "{ci}"], "go with --image or --base"),
    (["--no-seed"], "go with --image or --base"),
    (["--base", "{base}", "--no-seed", "--cloud-init", "{ci}"], "not both"),
    (["--base", "{base}", "--name", "my_vm"], "not a valid host name"),
    (["--base", "{base}", "--cloud-init", "{bad}"], "first line must be '#cloud-config'"),
    (["--base", "{base}", "--cloud-init", "{missing}"], "No such file"),
    (["--base", "{base}", "--cloud-init", "{huge}"], "larger than 64 KiB"),
])
def test_bad_seed_options_are_one_line_usage_errors(
    cli: Cli, tmp_path: Path, args: list[str], why: str
) -> None:
    paths = {"base": tmp_path / "b.qcow2", "ci": tmp_path / "ci.yaml",
             "bad": tmp_path / "bad.yaml", "missing": tmp_path / "none.yaml",
             "huge": tmp_path / "huge.yaml"}
    paths["base"].touch()
    paths["ci"].write_text("#cloud-config\n")
    paths["bad"].write_text("#include\nhttp://x\n")
    paths["huge"].write_bytes(b"#cloud-config\n" + b"#" * (1 << 20))
    proc = cli("run", "--dry-run", "--gpu", "none",
               *(a.format(**{k: str(v) for k, v in paths.items()}) for a in args))
    assert proc.returncode == 2, proc.stderr
    assert why in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_plan_keeps_the_instance_id_of_the_vm(egpu_home: Path, tmp_path: Path) -> None:
    vm = store.VmDir("keep")
    request = lifecycle.RunRequest(name="keep", arch="aarch64", cpus=1, memory_mib=512,
                                   base=str(tmp_path / "b.qcow2"))
    first = lifecycle.plan_seed(vm, request)
    assert first.instance_id.startswith(seed.INSTANCE_ID_PREFIX)
    assert lifecycle.plan_seed(vm, request).instance_id != first.instance_id  # no VM yet
    vm.create()
    vm.write_config(config(seed_instance_id=first.instance_id))
    assert lifecycle.plan_seed(vm, request).instance_id == first.instance_id
    json.loads(vm.file(store.CONFIG).read_text())  # still a plain JSON record
