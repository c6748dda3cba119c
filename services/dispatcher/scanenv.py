"""The environment a node scan's Trivy runs with: the scanned image's variables never change what Trivy does.

Pure data. The node scan runs inside the target image, which brings its own environment (Kubernetes cannot unset an
image's variable, only override it). Trivy 0.76 binds every flag to `TRIVY_<FLAG>` (and each alias to its own name)
through viper, which takes an empty value for unset; so every one of them is set to "" here, and the flags podsweep
passes win over the environment anyway. Variables Trivy or Go read directly are overridden too: a plugin to run
instead of Trivy, the plugin and VEX home, proxies, CA files, the Go runtime's knobs and the package managers'
directories the language analyzers look in.
"""

from __future__ import annotations

# Every flag name Trivy 0.76 may bind (all subcommands and global flags, and deprecated aliases), from its
# pkg/flag sources and `--help`. tests/integration/test_standin.py checks the real binary's flags against it.
_FLAG_NAMES = """
    account all ansible-extra-vars ansible-inventory ansible-playbook arn branch burst cacert cache-backend cache-dir
    cache-ttl cf-params check-namespaces checks-bundle checks-bundle-repository clear-cache commit compliance config
    config-check config-data config-file-schemas config-policy custom-headers data db-repository debug
    dependency-tree detection-priority disable-node-collector disable-telemetry distro docker-host download-db-only
    download-java-db-only enable-modules endpoint exclude-kinds exclude-namespaces exclude-nodes exclude-owned
    exit-code exit-on-eol file-patterns format generate-default-config helm-api-versions helm-kube-version helm-set
    helm-set-file helm-set-string helm-values ignore-policy ignore-status ignore-unfixed ignored-licenses ignorefile
    image-config-scanners image-src include-deprecated-checks include-dev-deps include-kinds include-namespaces
    include-non-failures input insecure java-db java-db-repository k8s-version kubeconfig license-confidence-level
    license-full light list-all-pkgs listen max-image-size misconfig-scanners module-dir namespaces no-progress
    node-collector-imageref node-collector-namespace offline-scan output output-plugin-arg parallel password
    password-stdin path-prefix pkg-relationships pkg-types platform podman-host policy policy-bundle-repository
    policy-namespaces qps quiet raw-config-scanners redis-ca redis-cert redis-key redis-tls region registry-token
    rego-error-limit rekor-url removed-pkgs render-cause report reset reset-checks-bundle reset-policy-bundle
    sbom-sources scan-cache scanners secret-config security-checks server service severity show-suppressed
    skip-check-update skip-db-update skip-dirs skip-files skip-images skip-java-db-update skip-policy-update
    skip-service skip-update skip-version-check skip-vex-repo-update slow table-mode tag template
    tf-exclude-downloaded-modules tf-vars timeout token token-header tolerations trace trace-http trace-rego username
    version vex vex-repo vuln-db vuln-severity-source vuln-type
"""
TRIVY_FLAGS = tuple(_FLAG_NAMES.split())

# Read by Trivy with os.Getenv, outside its flags.
TRIVY_DIRECT = ("TRIVY_RUN_AS_PLUGIN", "TRIVY_NON_SSL", "TRIVY_EXPERIMENTAL_RPM_ARCHIVE")
# Read by Go's standard library or Trivy's analyzers; "" means "not set" to every one of them.
OTHER = (
    # Plugin, VEX repository and cache homes (XDG_DATA_HOME + TRIVY_RUN_AS_PLUGIN would run the image's plugin).
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "XDG_CONFIG_HOME",
    "XDG_RUNTIME_DIR",
    # Where the client sends packages in client/server mode, and which CAs it trusts.
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "GODEBUG",
    "GOGC",
    "GOMEMLIMIT",
    "GOMAXPROCS",
    "GOTRACEBACK",
    # The dynamic loader's: the trivy binary is static (CGO off), but `jobs.trivy_binary` may name another build.
    "LD_PRELOAD",
    "LD_LIBRARY_PATH",
    "LD_AUDIT",
    # Directories the language analyzers read besides the scanned tree.
    "GOPATH",
    "VIRTUAL_ENV",
    "NUGET_PACKAGES",
    "GRADLE_USER_HOME",
    "PUB_CACHE",
    "CONAN_HOME",
    "CONAN_USER_HOME",
    "MAVEN_HOME",
)
# Trivy reads MAVEN_CENTRAL_URL with LookupEnv (set-but-empty counts), so it gets Trivy's own default.
MAVEN_CENTRAL = ("MAVEN_CENTRAL_URL", "https://search.maven.org/solrsearch/select")


def trivy_env_name(flag: str) -> str:
    """The variable Trivy binds to a flag: `--skip-files` is TRIVY_SKIP_FILES."""
    return "TRIVY_" + flag.replace("-", "_").upper()


def neutral_env(work_dir: str) -> list[dict[str, str]]:
    """Container env for Trivy inside a scanned image: HOME and TMPDIR in podsweep's volume, the rest neutral."""
    env = [{"name": "TMPDIR", "value": work_dir}, {"name": "HOME", "value": work_dir}]
    blank = [trivy_env_name(f) for f in TRIVY_FLAGS] + [*TRIVY_DIRECT, *OTHER]
    env += [{"name": name, "value": ""} for name in sorted(set(blank))]
    env.append({"name": MAVEN_CENTRAL[0], "value": MAVEN_CENTRAL[1]})
    return env
