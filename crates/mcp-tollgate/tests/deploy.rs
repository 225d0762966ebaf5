//! The Kubernetes manifests (deploy/kubernetes) and the Helm chart (deploy/helm)
//! checked against the real binary: the embedded configuration and policies pass
//! `tollgate validate` with the Secret's values, the command exists, and ports,
//! probe paths, mounts, selectors and the Redis address agree with each other.
//! Here the chart is checked statically (its values validate and every value it reads
//! exists); tests/e2e/test_chart.py renders it with Helm's engine.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]
// A scenario test reads top to bottom as one story: its length is allowed here.
#![allow(clippy::too_many_lines)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_yaml::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn get<'a>(value: &'a Value, path: &str) -> &'a Value {
    path.split('.')
        .fold(value, |v, key| match key.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[key],
        })
}

fn text<'a>(value: &'a Value, path: &str) -> &'a str {
    get(value, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {value:?}"))
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind) && d["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} named {name}"))
}

fn port_of(address: &str) -> u64 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let path =
            std::env::temp_dir().join(format!("tollgate-deploy-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Dir(path)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tollgate validate CONFIG` with `env`; its output when it fails.
fn validate(config: &Path, env: &BTreeMap<String, String>) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("validate")
        .arg(config)
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tollgate validate {}: {}{}",
        config.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The command line the container runs exists: the subcommand and each flag are
/// in the binary's own `--help`.
fn check_command(args: &[&str]) {
    let (command, flags) = args.split_first().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([command, &"--help"])
        .output()
        .unwrap();
    assert!(out.status.success(), "`tollgate {command}` does not exist");
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in flags.iter().filter(|f| f.starts_with("--")) {
        assert!(help.contains(flag), "`tollgate {command}` has no {flag}");
    }
}

#[test]
fn the_kubernetes_manifests_run_a_valid_configuration_on_two_replicas_sharing_redis() {
    let dir = root().join("deploy/kubernetes");
    let kustomization = &documents(&dir.join("kustomization.yaml"))[0];
    let listed: Vec<&str> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    present.sort();
    let mut sorted = listed.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted, present,
        "kustomization.yaml must list every manifest"
    );
    let docs: Vec<Value> = listed
        .iter()
        .flat_map(|f| documents(&dir.join(f)))
        .collect();

    let deployment = find(&docs, "Deployment", "tollgate");
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2));
    let pod = &deployment["spec"]["template"];
    let container = get(pod, "spec.containers.0");
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    check_command(&args);
    let config_path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];

    // The configuration file is the ConfigMap's, through the volume mounted there.
    let mount = container["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| config_path.starts_with(m["mountPath"].as_str().unwrap()))
        .expect("the --config file is on a mounted volume");
    let volume = pod["spec"]["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let config_map = find(&docs, "ConfigMap", text(volume, "configMap.name"));
    let laid = Dir::new("k8s");
    for item in volume["configMap"]["items"].as_sequence().unwrap() {
        let data = config_map["data"][text(item, "key")]
            .as_str()
            .expect("the ConfigMap has the item's key")
            .to_owned();
        let at = laid.0.join(text(item, "path"));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(at, data).unwrap();
    }
    let relative = config_path
        .strip_prefix(mount["mountPath"].as_str().unwrap())
        .unwrap()
        .trim_start_matches('/');
    let config_file = laid.0.join(relative);

    // Its `${VAR}`s are the container's variables, taken from the Secret.
    let mut env = BTreeMap::new();
    for var in container["env"].as_sequence().unwrap() {
        let name = text(var, "name").to_owned();
        if let Some(secret) = var["valueFrom"]["secretKeyRef"].as_mapping() {
            let secret_name = secret[&Value::from("name")].as_str().unwrap();
            let key = secret[&Value::from("key")].as_str().unwrap();
            let value = find(&docs, "Secret", secret_name)["stringData"][key]
                .as_str()
                .expect("the Secret has the key");
            env.insert(name, value.to_owned());
        } else if var["valueFrom"]["fieldRef"].is_mapping() {
            env.insert(name, "tollgate-0".to_owned());
        }
    }
    // The Secret ships placeholders, which Tollgate refuses until they are replaced.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("validate")
        .arg(&config_file)
        .env_clear()
        .envs(&env)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "the Secret's placeholders pass");
    assert!(String::from_utf8_lossy(&out.stderr).contains("still a placeholder"));
    for value in env.values_mut() {
        *value = value.replace("replace-me-with-", "");
    }
    validate(&config_file, &env);

    let config: Value =
        serde_yaml::from_str(&std::fs::read_to_string(&config_file).unwrap()).unwrap();
    let ports: BTreeMap<&str, u64> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (text(p, "name"), p["containerPort"].as_u64().unwrap()))
        .collect();
    assert_eq!(ports["http"], port_of(text(&config, "listen")));
    assert_eq!(ports["admin"], port_of(text(&config, "admin.listen")));
    assert!(
        text(&config, "listen").starts_with("0.0.0.0:"),
        "the pod must listen beyond loopback"
    );
    assert_eq!(text(container, "livenessProbe.httpGet.path"), "/healthz");
    assert_eq!(text(container, "livenessProbe.httpGet.port"), "admin");
    assert_eq!(text(container, "readinessProbe.httpGet.path"), "/readyz");
    assert_eq!(text(container, "readinessProbe.httpGet.port"), "admin");
    for (service, port) in [("tollgate", "http"), ("tollgate-admin", "admin")] {
        let service = find(&docs, "Service", service);
        assert_eq!(text(service, "spec.ports.0.targetPort"), port);
        assert_eq!(
            service["spec"]["selector"], pod["metadata"]["labels"],
            "the Service selects the pods"
        );
    }

    // The shared state is the Redis Service of these manifests.
    assert_eq!(text(&config, "state.backend"), "redis");
    let url = reqwest::Url::parse(text(&config, "state.url")).unwrap();
    let redis_service = find(&docs, "Service", url.host_str().unwrap());
    assert_eq!(
        redis_service["spec"]["ports"][0]["port"].as_u64(),
        url.port().map(u64::from)
    );
    let redis = find(&docs, "Deployment", url.host_str().unwrap());
    assert_eq!(
        redis_service["spec"]["selector"],
        redis["spec"]["template"]["metadata"]["labels"]
    );
    // Redis wants a password, which Tollgate's URL carries, and only Tollgate reaches it.
    assert!(url.password().is_some(), "state.url has no password");
    let redis_args = get(redis, "spec.template.spec.containers.0")["args"].clone();
    assert!(
        redis_args
            .as_sequence()
            .unwrap()
            .iter()
            .any(|a| a == "--requirepass"),
        "the shipped Redis has no password"
    );
    let policy = docs
        .iter()
        .find(|d| {
            d["kind"] == "NetworkPolicy"
                && d["spec"]["podSelector"]["matchLabels"]
                    == redis["spec"]["template"]["metadata"]["labels"]
        })
        .expect("a NetworkPolicy guards the Redis pods");
    assert_eq!(
        get(policy, "spec.ingress.0.from.0.podSelector.matchLabels"),
        &deployment["spec"]["template"]["metadata"]["labels"],
        "the NetworkPolicy lets Tollgate's pods in, and only them"
    );
    for deployment in [deployment, redis] {
        let container = get(deployment, "spec.template.spec.containers.0");
        for what in ["cpu", "memory"] {
            assert!(
                container["resources"]["requests"][what].is_string(),
                "{} requests no {what}",
                text(deployment, "metadata.name")
            );
        }
    }
}

/// Every `.Values.a.b` a template reads, as `a.b`.
fn values_read(template: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = template;
    while let Some(at) = rest.find(".Values.") {
        rest = &rest[at + ".Values.".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '_'))
            .unwrap_or(rest.len());
        found.push(rest[..end].trim_end_matches('.').to_owned());
    }
    found
}

#[test]
fn the_helm_chart_reads_only_values_it_has_and_its_defaults_validate() {
    let chart = root().join("deploy/helm/tollgate");
    let values = &documents(&chart.join("values.yaml"))[0];
    let chart_yaml = &documents(&chart.join("Chart.yaml"))[0];
    assert_eq!(text(chart_yaml, "apiVersion"), "v2");
    assert_eq!(
        text(chart_yaml, "appVersion"),
        env!("CARGO_PKG_VERSION"),
        "the chart's appVersion is the binary's version"
    );
    let mut templates = String::new();
    for entry in std::fs::read_dir(chart.join("templates")).unwrap() {
        templates.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
    }
    for read in values_read(&templates) {
        let value = read.split('.').fold(values, |v, key| &v[key]);
        assert!(
            !value.is_null(),
            "a template reads .Values.{read}, which values.yaml does not have"
        );
    }
    // The same command, ports and probes as the plain manifests.
    assert!(templates.contains(r#"args: ["serve", "--config", "/etc/tollgate/tollgate.yaml"]"#));
    check_command(&["serve", "--config"]);
    assert!(templates.contains("path: /healthz, port: admin"));
    assert!(templates.contains("path: /readyz, port: admin"));
    assert_eq!(values["replicaCount"].as_u64(), Some(2));

    // The default servers and policies make a valid configuration, laid out as the
    // chart mounts them (policies/<key>), with the chart's state settings.
    let laid = Dir::new("helm");
    std::fs::create_dir_all(laid.0.join("policies")).unwrap();
    for (name, policy) in values["policies"].as_mapping().unwrap() {
        std::fs::write(
            laid.0.join("policies").join(name.as_str().unwrap()),
            policy.as_str().unwrap(),
        )
        .unwrap();
    }
    let config = format!(
        "listen: 0.0.0.0:{}\nadmin:\n  listen: 0.0.0.0:{}\n  token: ${{TOLLGATE_ADMIN_TOKEN}}\nstate:\n  backend: redis\n  url: redis://release-tollgate-redis:6379/0\n  prefix: {:?}\n  on_failure: {}\n  timeout: {}\nservers:\n{}",
        values["service"]["port"].as_u64().unwrap(),
        values["admin"]["port"].as_u64().unwrap(),
        text(values, "state.prefix"),
        text(values, "state.onFailure"),
        text(values, "state.timeout"),
        serde_yaml::to_string(&values["servers"])
            .unwrap()
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>(),
    );
    std::fs::write(laid.0.join("tollgate.yaml"), config).unwrap();
    let env = BTreeMap::from([(
        "TOLLGATE_ADMIN_TOKEN".to_owned(),
        "a-long-random-admin-token".to_owned(),
    )]);
    validate(&laid.0.join("tollgate.yaml"), &env);
}
