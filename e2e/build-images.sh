#!/usr/bin/env bash
# Builds the e2e images without Docker or a registry, as docker-archive tarballs for
# `ctr -n k8s.io images import` (run them with `imagePullPolicy: Never`):
#
#   mailpod:e2e                 mail-image/Dockerfile, stage `mail`
#   mailpod-operator:e2e        mail-image/Dockerfile, stage `operator`
#   registry.k8s.io/pause:3.10  e2e/pause/pause.c, static: containerd's default sandbox image, no pull
#
# The Dockerfile is the recipe: its stages are read and carried out instruction by instruction, so
# nothing here repeats what it says. `FROM debian:<suite>-slim` is made from Debian's packages
# (`debootstrap --variant=minbase <suite>` from the mirror apt on this machine uses, then the apt/dpkg
# settings of Debian's slim images); RUN runs `/bin/sh -c` in a chroot (private mount and UTS namespaces:
# proc, dev and resolv.conf are mounted there only and vanish with it); COPY from the repository copies
# files, owned by root; `COPY --from=builder /usr/local/bin/mailpod-operator` copies the binary built by
# cargo; ENV, WORKDIR, USER, EXPOSE, STOPSIGNAL, LABEL, ENTRYPOINT and CMD go to the image config.
# An instruction it does not know fails the build. `--plan` prints what it would do as JSON (no root
# needed); tests/dataplane_image.rs checks that plan against the Dockerfile.
#
# Each stage's root filesystem up to its first `COPY --from=builder` is cached, keyed by the base recipe,
# the mirror, the instructions and the files they copy (so by mail-image/packages.txt): a warm run copies
# the cached tree, adds the binary and packs it. Layers are packed with GNU tar and numeric owners
# (postfix, dovecot, vmail 5000 keep their uids); config and manifest.json are written here.
#
# Usage: e2e/build-images.sh [--out DIR] [--binary PATH] [--cache DIR] [--only LIST] [--tag TAG]
#                            [--rebuild] [--plan]
#   --out DIR      where the tarballs go (env MAILPOD_IMAGES_DIR; default target/e2e/images)
#   --binary PATH  the operator binary (env MAILPOD_OPERATOR_BIN; default target/release/mailpod-operator;
#                  build it with `cargo build --release --locked --no-default-features --bin mailpod-operator`)
#   --cache DIR    cached root filesystems (env MAILPOD_IMAGE_CACHE; default target/e2e/image-cache)
#   --only LIST    comma-separated subset of mail,operator,pause (env MAILPOD_IMAGES; default all three)
#   --tag TAG      tag of the mail and operator images (env MAILPOD_IMAGE_TAG; default e2e)
#   --rebuild      ignore the cache (env MAILPOD_IMAGE_REBUILD=1), e.g. to pick up Debian updates
#   --plan         print the build plan as JSON and exit
# Env MAILPOD_DEBIAN_MIRROR / MAILPOD_DEBIAN_SECURITY_MIRROR override the mirrors read from apt's sources.
# Output files: mailpod-TAG.tar, mailpod-operator-TAG.tar, pause-3.10.tar; one line per image on stdout:
#   IMAGE <name> <file> <bytes>
# Needs root (chroot, namespaces); installs debootstrap, gcc and libc6-dev with apt-get when missing.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${MAILPOD_IMAGES_DIR:-$repo/target/e2e/images}
binary=${MAILPOD_OPERATOR_BIN:-$repo/target/release/mailpod-operator}
cache=${MAILPOD_IMAGE_CACHE:-$repo/target/e2e/image-cache}
only=${MAILPOD_IMAGES:-mail,operator,pause}
tag=${MAILPOD_IMAGE_TAG:-e2e}
rebuild=${MAILPOD_IMAGE_REBUILD:-0}
plan=0

usage() { sed -n '/^# Usage:/,/^# Needs root/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case $1 in
    --out) out=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    --cache) cache=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --rebuild) rebuild=1; shift ;;
    --plan) plan=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) echo "build-images: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done
log() { echo "build-images: $*" >&2; }
abspath() { case $1 in /*) echo "$1" ;; *) echo "$PWD/$1" ;; esac; }
out=$(abspath "$out"); binary=$(abspath "$binary"); cache=$(abspath "$cache")

command -v python3 >/dev/null 2>&1 || {
  [ "$plan" = 1 ] && { log "python3 is needed"; exit 1; }
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-minimal >&2
}

if [ "$plan" != 1 ]; then
  [ "$(id -u)" = 0 ] || { log "must run as root (debootstrap, chroot, namespaces)"; exit 1; }
  missing=()
  command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
  [ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || missing+=(debian-archive-keyring)
  case ",$only," in
    *,pause,*)
      command -v gcc >/dev/null 2>&1 || missing+=(gcc)
      [ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -e "/usr/lib/$(gcc -dumpmachine 2>/dev/null)/libc.a" ] ||
        missing+=(libc6-dev)
      ;;
  esac
  for c in unshare chroot tar; do command -v $c >/dev/null 2>&1 || { log "$c is missing"; exit 1; }; done
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
  fi
  case ",$only," in
    *,mail,* | *,operator,*) [ -x "$binary" ] || {
      log "no operator binary at $binary (cargo build --release --locked --no-default-features --bin mailpod-operator)"
      exit 1
    } ;;
  esac
  mkdir -p "$cache" "$out"
  # Every chroot mount is made in a private mount namespace and goes away with it. Should one survive
  # anyway (a debootstrap killed mid-way in an older layout), it is unmounted here, deepest first.
  unmount_under_cache() {
    local m
    awk -v c="$cache/" 'index($5, c) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
      while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  }
  trap unmount_under_cache EXIT
  trap 'unmount_under_cache; exit 130' INT
  trap 'unmount_under_cache; exit 143' TERM
fi

export BI_REPO=$repo BI_OUT=$out BI_BINARY=$binary BI_CACHE=$cache BI_ONLY=$only BI_TAG=$tag \
  BI_REBUILD=$rebuild BI_PLAN=$plan
python3 - <<'PY'
import hashlib, json, os, re, shlex, shutil, signal, subprocess, sys, tarfile, tempfile, time

REPO, OUT, BINARY, CACHE = (os.environ[k] for k in ("BI_REPO", "BI_OUT", "BI_BINARY", "BI_CACHE"))
ONLY = [s for s in os.environ["BI_ONLY"].split(",") if s]
TAG, REBUILD, PLAN = os.environ["BI_TAG"], os.environ["BI_REBUILD"] == "1", os.environ["BI_PLAN"] == "1"
DOCKERFILE = "mail-image/Dockerfile"
BINARY_IN_BUILDER = "/usr/local/bin/mailpod-operator"  # what `COPY --from=builder` may take
PAUSE_SRC = "e2e/pause/pause.c"
IMAGES = {  # what: (stage, image name, file)
    "mail": ("mail", f"mailpod:{TAG}", f"mailpod-{TAG}.tar"),
    "operator": ("operator", f"mailpod-operator:{TAG}", f"mailpod-operator-{TAG}.tar"),
    "pause": (None, "registry.k8s.io/pause:3.10", "pause-3.10.tar"),
}
# Also tagged as containerd 1.6's built-in default sandbox image, so a containerd left with its default
# configuration needs no pull either (e2e/cluster-up.sh names 3.10, the Kubernetes 1.33 one).
PAUSE_ALSO = ["registry.k8s.io/pause:3.6"]
# Docker's default for RUN and the PATH of Debian's images.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ARCHES = {"amd64": ("amd64", None), "arm64": ("arm64", "v8"), "armhf": ("arm", "v7"), "i386": ("386", None),
          "ppc64el": ("ppc64le", None), "s390x": ("s390x", None)}

signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def log(*a):
    print("build-images:", *a, file=sys.stderr, flush=True)


def fail(msg):
    log(msg)
    sys.exit(1)


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(*parts):
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions():
    """(keyword, arguments) of each instruction: comment lines dropped, continuation lines joined."""
    text = open(os.path.join(REPO, DOCKERFILE)).read()
    lines = [l for l in text.splitlines() if not l.lstrip().startswith("#")]
    joined, cur = [], ""
    for l in lines:
        if l.rstrip().endswith("\\"):
            cur += l.rstrip()[:-1] + " "
            continue
        cur += l
        if cur.strip():
            kw, _, rest = cur.strip().partition(" ")
            joined.append((kw.upper(), rest.strip()))
        cur = ""
    return joined


def stages():
    out, cur = {}, None
    for kw, rest in dockerfile_instructions():
        if kw == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            cur = {"from": words[0], "name": name, "steps": []}
            out[name or f"#{len(out)}"] = cur
        elif kw in ("ARG",) and cur is None:
            fail(f"{DOCKERFILE}: global ARG is not supported here")
        else:
            cur["steps"].append((kw, rest))
    return out


def exec_form(rest):
    """JSON (exec) form as a list, shell form wrapped in /bin/sh -c, as Docker does."""
    if rest.startswith("["):
        return json.loads(rest)
    return ["/bin/sh", "-c", rest]


def plan_stage(stage_name):
    st = stages().get(stage_name) or fail(f"{DOCKERFILE}: no stage {stage_name}")
    m = re.fullmatch(r"debian:([a-z]+)-slim", st["from"])
    if not m:
        fail(f"{DOCKERFILE} stage {stage_name}: FROM {st['from']}: only debian:<suite>-slim can be made here")
    steps, config = [], {"Env": [f"PATH={PATH}"]}
    for kw, rest in st["steps"]:
        if kw == "RUN":
            if rest.startswith("--"):
                fail(f"RUN flags are not supported here: {rest}")
            steps.append({"op": "RUN", "argv": exec_form(rest), "env": list(config["Env"]),
                          "workdir": config.get("WorkingDir", "/")})
        elif kw == "COPY":
            words = shlex.split(rest)
            flags = [w for w in words if w.startswith("--")]
            srcs, dest = words[len(flags):-1], words[-1]
            if flags == ["--from=builder"]:
                if srcs != [BINARY_IN_BUILDER]:
                    fail(f"COPY --from=builder copies only {BINARY_IN_BUILDER} here: {rest}")
                steps.append({"op": "COPY_BINARY", "dest": dest})
            elif flags:
                fail(f"COPY flags are not supported here: {rest}")
            else:
                if len(srcs) != 1 or any(c in srcs[0] for c in "*?[") or not dest.startswith("/"):
                    fail(f"COPY of one file to an absolute path only: {rest}")
                if not os.path.isfile(os.path.join(REPO, srcs[0])):
                    fail(f"COPY {srcs[0]}: not a file of the repository")
                steps.append({"op": "COPY", "src": srcs[0], "dest": dest})
        elif kw == "ENV":
            words = shlex.split(rest)
            pairs = [w.split("=", 1) for w in words] if "=" in words[0] else [[words[0], " ".join(words[1:])]]
            for k, v in pairs:
                config["Env"] = [e for e in config["Env"] if not e.startswith(k + "=")] + [f"{k}={v}"]
        elif kw == "WORKDIR":
            config["WorkingDir"] = rest
            steps.append({"op": "MKDIR", "path": rest})
        elif kw == "USER":
            config["User"] = rest
        elif kw == "EXPOSE":
            config.setdefault("ExposedPorts", {})
            for p in rest.split():
                config["ExposedPorts"][p if "/" in p else p + "/tcp"] = {}
        elif kw == "STOPSIGNAL":
            config["StopSignal"] = rest
        elif kw == "LABEL":
            for w in shlex.split(rest):
                k, _, v = w.partition("=")
                config.setdefault("Labels", {})[k] = v
        elif kw == "ENTRYPOINT":
            config["Entrypoint"] = exec_form(rest)
            config.pop("Cmd", None)  # Docker: ENTRYPOINT resets an inherited CMD
        elif kw == "CMD":
            config["Cmd"] = exec_form(rest)
        else:
            fail(f"{DOCKERFILE} stage {stage_name}: {kw} is not supported by e2e/build-images.sh")
    return {"suite": m.group(1), "steps": steps, "config": config}


# ---------------------------------------------------------------- mirrors


def apt_sources():
    """Entries (types, uris, suites, components) of apt's sources on this machine, both formats."""
    entries, files = [], []
    if os.path.isfile("/etc/apt/sources.list"):
        files.append("/etc/apt/sources.list")
    d = "/etc/apt/sources.list.d"
    if os.path.isdir(d):
        files += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith((".list", ".sources"))]
    for path in files:
        text = open(path).read()
        if path.endswith(".sources"):
            for para in re.split(r"\n\s*\n", text):
                fields, key = {}, None
                for line in para.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0] in " \t" and key:
                        fields[key] += " " + line.strip()
                        continue
                    key, _, val = line.partition(":")
                    key = key.strip().lower()
                    fields[key] = val.strip()
                if fields.get("enabled", "yes").lower() == "no" or "uris" not in fields:
                    continue
                entries.append((fields.get("types", "").split(), fields["uris"].split(),
                                fields.get("suites", "").split(), fields.get("components", "").split()))
        else:
            for line in text.splitlines():
                line = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
                if len(line) >= 3 and line[0] == "deb":
                    entries.append((["deb"], [line[1]], [line[2]], line[3:]))
    return entries


def mirrors(suite):
    """The Debian archive and security URIs apt uses here, reused exactly (they may be a proxy)."""
    main = os.environ.get("MAILPOD_DEBIAN_MIRROR")
    security = os.environ.get("MAILPOD_DEBIAN_SECURITY_MIRROR")
    debs = [e for e in apt_sources() if "deb" in e[0] and "main" in e[3]]

    def pick(test):
        for _, uris, suites, _ in debs:
            if any(test(s) for s in suites):
                return uris[0].rstrip("/")
        return None

    main = main or pick(lambda s: s == suite) or pick(lambda s: re.fullmatch(r"[a-z]+(-updates)?", s))
    security = security or pick(lambda s: s == f"{suite}-security") or pick(lambda s: s.endswith("-security"))
    if not main:
        fail("no Debian mirror in /etc/apt/sources.list{,.d/*} (set MAILPOD_DEBIAN_MIRROR)")
    return main, security


def apt_proxy_env():
    """A proxy configured for apt here also serves debootstrap and the chroot's apt (not kept in the image)."""
    env = {k: os.environ[k] for k in ("http_proxy", "https_proxy", "no_proxy") if k in os.environ}
    try:
        out = subprocess.run(["apt-config", "shell", "P", "Acquire::http::Proxy"], capture_output=True,
                             text=True).stdout
        m = re.search(r"P='([^']+)'", out)
        if m and "http_proxy" not in env:
            env["http_proxy"] = m.group(1)
    except FileNotFoundError:
        pass
    return env


# ---------------------------------------------------------------- root filesystems

# What turns a minbase debootstrap into the equivalent of Debian's `<suite>-slim` image (the settings
# Debian's image builder writes): no docs but copyright, no man/info/locale files, apt keeps no .debs,
# no translations, compressed lists. Changing this list changes the cache key.
SLIM_DPKG = """# As in Debian's slim images: no documentation but copyright, no manuals, no locales.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
"""
SLIM_APT = {
    "docker-clean": 'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb'
                    ' /var/cache/apt/*.bin || true"; };\nAPT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb'
                    ' /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };\n'
                    'Dir::Cache::pkgcache "";\nDir::Cache::srcpkgcache "";\n',
    "docker-autoremove-suggests": 'Apt::AutoRemove::SuggestsImportant "false";\n',
    "docker-gzip-indexes": 'Acquire::GzipIndexes "true";\nAcquire::CompressionTypes::Order:: "gz";\n',
    "docker-no-languages": 'Acquire::Languages "none";\n',
}
SLIM_CLEAN = (
    "find /usr/share/doc -mindepth 1 -not -type d -not -name copyright -delete; "
    "find /usr/share/doc -mindepth 1 -type d -empty -delete; "
    "rm -rf /usr/share/man/* /usr/share/groff/* /usr/share/info/* /usr/share/lintian/* /usr/share/linda/* "
    "/usr/share/locale/*; "
    "apt-get clean; rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt/* /var/log/*.log "
    "/var/log/bootstrap.log /var/cache/ldconfig/aux-cache /var/lib/dpkg/*-old /var/cache/debconf/*-old; "
    ": > /etc/machine-id; rm -f /etc/hostname /etc/apt/sources.list"
)
# Keeps package scripts from starting daemons in the chroot while a RUN step runs; removed afterwards.
POLICY_RC = "/usr/sbin/policy-rc.d"


def mounts_under(path):
    path = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].replace("\\040", " ")
            if mp == path or mp.startswith(path + "/"):
                found.append(mp)
    return sorted(found, reverse=True)


def remove_tree(path):
    """rm -rf that never crosses into a mount (a bind-mounted /dev would be the host's)."""
    if not os.path.lexists(path):
        return
    for mp in mounts_under(path):
        subprocess.run(["umount", mp], check=False)
    if mounts_under(path):
        fail(f"{path} still has mounts: {mounts_under(path)}; not removing it")
    shutil.rmtree(path)


def in_chroot(root, argv, env=None, workdir="/"):
    """argv in the chroot, in private mount, PID and UTS namespaces, as a container build step runs:
    a fresh proc, a tmpfs /dev holding only the harmless device nodes (bound from the host's), and
    copies of the host's resolv.conf and hosts (so the mirror resolves as it does here). Nothing of the
    host is writable through them, and every mount disappears with the step, however it ends."""
    scratch = tempfile.mkdtemp(prefix="tmp-run-", dir=CACHE)
    created = []
    try:
        for f in ("resolv.conf", "hosts"):
            host = os.path.join("/etc", f)
            target = os.path.join(root, "etc", f)
            if not os.path.isfile(host) or os.path.islink(target):
                continue
            shutil.copyfile(host, os.path.join(scratch, f))
            if f == "hosts":  # the step's own name resolves, as in a container build
                with open(os.path.join(scratch, f), "a") as h:
                    h.write("\n127.0.0.1 buildkitsandbox\n")
            if not os.path.lexists(target):
                open(target, "w").close()
                created.append(target)
        setup = (
            'set -e; r=$1; s=$2; shift 2; '
            'mount -t proc proc "$r/proc"; '
            'mount -t tmpfs -o mode=755,nosuid,size=64m dev "$r/dev"; '
            'for n in null zero full random urandom tty; do : > "$r/dev/$n"; mount --bind "/dev/$n" "$r/dev/$n"; done; '
            'mkdir -p "$r/dev/pts" "$r/dev/shm"; mount -t tmpfs -o nosuid,nodev shm "$r/dev/shm"; '
            'mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$r/dev/pts"; ln -s pts/ptmx "$r/dev/ptmx"; '
            'ln -s /proc/self/fd "$r/dev/fd"; ln -s /proc/self/fd/0 "$r/dev/stdin"; '
            'ln -s /proc/self/fd/1 "$r/dev/stdout"; ln -s /proc/self/fd/2 "$r/dev/stderr"; '
            'for f in resolv.conf hosts; do [ -f "$s/$f" ] && [ -f "$r/etc/$f" ] && mount --bind "$s/$f" "$r/etc/$f"; done; '
            'hostname buildkitsandbox; '
            'exec chroot "$r" /bin/sh -c \'cd "$1" && shift && exec "$@"\' sh "$@"'
        )
        run_env = dict(env or {"PATH": PATH})
        run_env.setdefault("HOME", "/root")
        run_env.setdefault("PATH", PATH)
        run_env["HOSTNAME"] = "buildkitsandbox"
        r = subprocess.run(["unshare", "--mount", "--uts", "--pid", "--fork", "--", "/bin/sh", "-c", setup,
                            "sh", root, scratch, workdir, *argv], env=run_env, stdout=sys.stderr)
        return r.returncode
    finally:
        for t in created:
            os.unlink(t)
        shutil.rmtree(scratch)


def write(path, text, mode=0o644):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def sources_file(suite, main, security):
    s = (f"Types: deb\nURIs: {main}\nSuites: {suite} {suite}-updates\nComponents: main\n"
         "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    if security:
        s += (f"\nTypes: deb\nURIs: {security}\nSuites: {suite}-security\nComponents: main\n"
              "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    return s


def dpkg_arch():
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


def cache_dir(kind, key):
    return os.path.join(CACHE, f"{kind}-{key[:16]}")


def prune(kind, keep):
    for d in os.listdir(CACHE):
        p = os.path.join(CACHE, d)
        if d.startswith(kind + "-") and p != keep and os.path.isdir(p) and re.fullmatch(r"[0-9a-f]{16}", d[len(kind) + 1:]):
            log(f"removing stale cache {d}")
            remove_tree(p)


BASES = {}  # made once a run, whatever the number of stages on it


def base_rootfs(suite):
    """debian:<suite>-slim, made here: debootstrap minbase + the slim settings."""
    if suite not in BASES:
        BASES[suite] = make_base_rootfs(suite)
    return BASES[suite]


def make_base_rootfs(suite):
    arch = dpkg_arch()
    main, security = mirrors(suite)
    key = sha256_text("base-v2", suite, arch, main, security or "", SLIM_DPKG, json.dumps(SLIM_APT), SLIM_CLEAN)
    dest = cache_dir("base", key)
    if os.path.isdir(dest) and not REBUILD:
        return dest, key
    tmp = os.path.join(CACHE, "tmp-base")
    remove_tree(tmp)
    log(f"debootstrap --variant=minbase {suite} from {main} (a few minutes)")
    t = time.time()
    logfile = os.path.join(CACHE, "debootstrap.log")
    env = dict(os.environ, **apt_proxy_env())
    with open(logfile, "w") as lf:
        r = subprocess.run(["unshare", "--mount", "--fork", "--", "debootstrap", "--variant=minbase",
                            f"--arch={arch}", suite, tmp, main], stdout=lf, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        subprocess.run(["tail", "-n", "30", logfile], stdout=sys.stderr)
        fail(f"debootstrap failed ({logfile})")
    write(os.path.join(tmp, "etc/dpkg/dpkg.cfg.d/docker"), SLIM_DPKG)
    for name, text in SLIM_APT.items():
        write(os.path.join(tmp, "etc/apt/apt.conf.d", name), text)
    write(os.path.join(tmp, "etc/apt/sources.list.d/debian.sources"), sources_file(suite, main, security))
    if in_chroot(tmp, ["/bin/sh", "-c", SLIM_CLEAN]) != 0:
        fail("cleaning the base failed")
    write(os.path.join(tmp, "etc/resolv.conf"), "")  # debootstrap's copy of this machine's; the runtime mounts one
    log(f"base ready in {time.time() - t:.0f} s")
    remove_tree(dest)
    os.rename(tmp, dest)
    prune("base", dest)
    return dest, key


def apply_steps(root, steps, env_extra, binary=None):
    for s in steps:
        if s["op"] == "RUN":
            env = dict(e.split("=", 1) for e in s["env"])
            env.update(env_extra)
            log("RUN", " ".join(s["argv"][2:] if s["argv"][:2] == ["/bin/sh", "-c"] else s["argv"])[:160])
            write(os.path.join(root, POLICY_RC.lstrip("/")), "#!/bin/sh\nexit 101\n", 0o755)
            try:
                rc = in_chroot(root, s["argv"], env=env, workdir=s["workdir"])
            finally:
                os.unlink(os.path.join(root, POLICY_RC.lstrip("/")))
            if rc != 0:
                fail(f"RUN failed with {rc}")
        elif s["op"] in ("COPY", "COPY_BINARY"):
            src = os.path.join(REPO, s["src"]) if s["op"] == "COPY" else binary
            dest = s["dest"]
            if dest.endswith("/"):
                dest += os.path.basename(src)
            target = os.path.join(root, dest.lstrip("/"))
            parent = os.path.dirname(target)
            os.makedirs(parent, exist_ok=True)
            times = os.stat(parent).st_atime_ns, os.stat(parent).st_mtime_ns
            if os.path.lexists(target):
                os.unlink(target)
            shutil.copy2(src, target)
            os.chown(target, 0, 0)
            # The same inputs give the same layer, byte for byte: an unchanged image imports as unchanged.
            os.utime(parent, ns=times)
        elif s["op"] == "MKDIR":
            os.makedirs(os.path.join(root, s["path"].lstrip("/")), exist_ok=True)


def split_at_binary(steps):
    i = next((n for n, s in enumerate(steps) if s["op"] == "COPY_BINARY"), len(steps))
    return steps[:i], steps[i:]


def stage_rootfs(name, plan):
    """The stage's tree up to its first `COPY --from=builder`, cached."""
    base, base_key = base_rootfs(plan["suite"])
    prefix, _ = split_at_binary(plan["steps"])
    files = [sha256_file(os.path.join(REPO, s["src"])) for s in prefix if s["op"] == "COPY"]
    key = sha256_text("stage-v1", base_key, json.dumps(prefix, sort_keys=True), *files)
    dest = cache_dir(name, key)
    if os.path.isdir(dest) and not REBUILD:
        log(f"{name}: cached root filesystem {os.path.basename(dest)}")
        return dest
    tmp = os.path.join(CACHE, f"tmp-{name}")
    remove_tree(tmp)
    t = time.time()
    subprocess.run(["cp", "-a", "--reflink=auto", base, tmp], check=True)
    apply_steps(tmp, prefix, apt_proxy_env())
    log(f"{name}: root filesystem ready in {time.time() - t:.0f} s")
    remove_tree(dest)
    os.rename(tmp, dest)
    prune(name, dest)
    return dest


# ---------------------------------------------------------------- packing


def pack_layer(root, layer):
    """One layer: every file with its numeric owner, mode, hard links and file capabilities; /dev, /proc
    and /sys empty (the runtime mounts them)."""
    subprocess.run(["tar", "--create", "--file", layer, "--numeric-owner", "--sort=name", "--one-file-system",
                    "--xattrs", "--xattrs-include=security.capability",
                    "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime", "--exclude=./dev/*", "--exclude=./proc/*",
                    "--exclude=./sys/*", "-C", root, "."], check=True)


def check_owners(root, layer):
    """The layer's owners are the tree's: a packer that made files root's would break the mail software."""
    nonroot = 0
    with tarfile.open(layer) as t:
        for m in t:
            st = os.lstat(os.path.join(root, m.name))
            if (m.uid, m.gid) != (st.st_uid, st.st_gid):
                fail(f"{m.name}: {m.uid}:{m.gid} in the layer, {st.st_uid}:{st.st_gid} in the tree")
            nonroot += (m.uid, m.gid) != (0, 0)
    return nonroot


def write_archive(path, names, layer, config, created_by, epoch):
    """A docker-archive (what `docker save` writes) of one layer; `created` and every mtime are the
    newest input's, so the same inputs give the same file."""
    arch, variant = ARCHES.get(dpkg_arch(), (dpkg_arch(), None))
    diff_id = sha256_file(layer)
    epoch = int(epoch)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
    image = {"architecture": arch, "os": "linux", "created": now, "config": config,
             "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
             "history": [{"created": now, "created_by": created_by}]}
    if variant:
        image["variant"] = variant
    cfg = json.dumps(image, sort_keys=True, separators=(",", ":")).encode()
    cfg_id = hashlib.sha256(cfg).hexdigest()
    manifest = json.dumps([{"Config": f"{cfg_id}.json", "RepoTags": names, "Layers": [f"{diff_id}/layer.tar"]}]).encode()
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
        def add_bytes(arcname, data):
            ti = tarfile.TarInfo(arcname)
            ti.size, ti.mode, ti.mtime = len(data), 0o644, epoch
            t.addfile(ti, io_bytes(data))
        d = tarfile.TarInfo(diff_id)
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, epoch
        t.addfile(d)
        ti = t.gettarinfo(layer, arcname=f"{diff_id}/layer.tar")
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        ti.mtime = epoch
        with open(layer, "rb") as f:
            t.addfile(ti, f)
        add_bytes(f"{cfg_id}.json", cfg)
        add_bytes("manifest.json", manifest)
    os.rename(tmp, path)
    return cfg_id


def io_bytes(data):
    import io
    return io.BytesIO(data)


def build_stage(what):
    stage, name, fname = IMAGES[what]
    t = time.time()
    plan = plan_stage(stage)
    cached = stage_rootfs(stage, plan)
    _, suffix = split_at_binary(plan["steps"])
    work = os.path.join(CACHE, f"work-{stage}")
    remove_tree(work)
    subprocess.run(["cp", "-a", "--reflink=auto", cached, work], check=True)
    try:
        apply_steps(work, suffix, apt_proxy_env(), binary=BINARY)
        layer = os.path.join(CACHE, f"layer-{stage}.tar")
        pack_layer(work, layer)
        nonroot = check_owners(work, layer)
        write_archive(os.path.join(OUT, fname), [name], layer, plan["config"],
                      f"e2e/build-images.sh: {DOCKERFILE} stage {stage}",
                      max(os.stat(BINARY).st_mtime, os.stat(cached).st_mtime))
        os.unlink(layer)
    finally:
        remove_tree(work)
    log(f"{name}: {fname} in {time.time() - t:.0f} s ({nonroot} entries not owned by root:root)")
    return name, fname


def build_pause():
    _, name, fname = IMAGES["pause"]
    src = os.path.join(REPO, PAUSE_SRC)
    root = os.path.join(CACHE, "pause-root")
    remove_tree(root)
    os.makedirs(root)
    subprocess.run(["gcc", "-static", "-O2", "-s", "-Wall", "-Wextra", "-o", os.path.join(root, "pause"), src],
                   check=True)
    os.chmod(os.path.join(root, "pause"), 0o755)
    layer = os.path.join(CACHE, "layer-pause.tar")
    epoch = int(os.stat(src).st_mtime)
    subprocess.run(["tar", "--create", "--file", layer, "--numeric-owner", "--owner=0", "--group=0",
                    f"--mtime=@{epoch}", "-C", root, "pause"], check=True)
    # As the upstream image: /pause as entrypoint, run as 65535.
    config = {"Env": [f"PATH={PATH}"], "Entrypoint": ["/pause"], "User": "65535:65535"}
    write_archive(os.path.join(OUT, fname), [name, *PAUSE_ALSO], layer, config,
                  f"e2e/build-images.sh: gcc -static {PAUSE_SRC}", epoch)
    os.unlink(layer)
    remove_tree(root)
    return name, fname


def main():
    for w in ONLY:
        if w not in IMAGES:
            fail(f"unknown image {w} (mail, operator, pause)")
    if PLAN:
        plan = []
        for w in ONLY:
            stage, name, fname = IMAGES[w]
            entry = {"what": w, "name": name, "file": fname}
            if stage:
                p = plan_stage(stage)
                entry.update(stage=stage, dockerfile=DOCKERFILE, base={"debootstrap": ["--variant=minbase", p["suite"]]},
                             steps=p["steps"], config=p["config"])
            else:
                entry.update(also=PAUSE_ALSO, source=PAUSE_SRC,
                             config={"Entrypoint": ["/pause"], "User": "65535:65535"})
            plan.append(entry)
        json.dump({"images": plan}, sys.stdout, indent=1)
        print()
        return
    os.makedirs(OUT, exist_ok=True)
    for d in os.listdir(CACHE):  # left by an interrupted run
        if d.startswith(("tmp-", "work-")) or d == "pause-root":
            remove_tree(os.path.join(CACHE, d))
    built = [build_pause() if w == "pause" else build_stage(w) for w in ONLY]
    for name, fname in built:
        p = os.path.join(OUT, fname)
        print(f"IMAGE {name} {p} {os.path.getsize(p)}")
        sys.stdout.flush()


main()
PY
