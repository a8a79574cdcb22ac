//! Bad input gets a typed error naming the field, never a panic; Paperclip's
//! stored JSON round-trips unchanged.

use paperclip_env::core::config::{ConfigShape, DriverConfig, SandboxConfig};
use paperclip_env::core::{Environment, EnvironmentLease, Error, ExecuteResult};
use serde_json::{Value, json};

fn odd_values() -> Vec<Value> {
    vec![
        Value::Null,
        json!(true),
        json!(0),
        json!(-1),
        json!(1.5),
        json!(1e300),
        json!(""),
        json!("   "),
        json!("\u{0}"),
        json!("../../etc/passwd"),
        json!([]),
        json!([1, "a"]),
        json!({}),
        json!({"nested": {"deep": [null]}}),
        json!("x".repeat(10_000)),
    ]
}

#[test]
fn no_config_parser_panics_on_any_field_value() {
    let fields = [
        "host",
        "port",
        "username",
        "remoteWorkspacePath",
        "privateKey",
        "privateKeySecretRef",
        "knownHosts",
        "strictHostKeyChecking",
        "identityFile",
        "provider",
        "image",
        "reuseLease",
        "timeoutMs",
        "pluginKey",
        "driverKey",
        "driverConfig",
    ];
    for driver in ["local", "ssh", "sandbox", "plugin", "nonsense"] {
        for field in fields {
            for value in odd_values() {
                let config = json!({ field: value });
                for shape in [ConfigShape::Stored, ConfigShape::Input] {
                    if let Err(e) = DriverConfig::parse(driver, &config, shape) {
                        match e {
                            Error::InvalidConfig {
                                message, issues, ..
                            } => {
                                assert!(!message.is_empty());
                                assert!(!issues.is_empty());
                            }
                            other => panic!("untyped config error for {driver}.{field}: {other:?}"),
                        }
                    }
                }
            }
            for whole in odd_values() {
                let _ = DriverConfig::parse(driver, &whole, ConfigShape::Stored);
            }
        }
    }
}

#[test]
fn errors_name_the_field() {
    let Error::InvalidConfig { field, issues, .. } = DriverConfig::parse(
        "sandbox",
        &json!({"provider": "e2b", "timeoutMs": "soon"}),
        ConfigShape::Stored,
    )
    .unwrap_err() else {
        panic!("expected InvalidConfig")
    };
    assert_eq!(field, "timeoutMs");
    assert!(issues[0].message.contains("timeoutMs"));
    let err = DriverConfig::parse("docker", &json!({}), ConfigShape::Stored).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Unsupported environment driver \"docker\"."
    );
}

#[test]
fn paperclip_environment_and_results_round_trip() {
    let env = json!({"id": "0b6f…", "companyId": "c-1", "name": "E2B", "description": null, "driver": "sandbox",
        "status": "active", "config": {"provider": "e2b", "timeoutMs": 300000, "reuseLease": false, "template": "base",
        "apiKey": "7a1c2b8e-1111-4222-8333-944455556666"}, "envVars": {}, "metadata": null,
        "createdAt": "2026-05-11T10:00:00.000Z", "updatedAt": "2026-05-11T10:00:00.000Z"});
    let parsed: Environment = serde_json::from_value(env.clone()).unwrap();
    assert_eq!(serde_json::to_value(&parsed).unwrap(), env);
    let config = SandboxConfig::parse(&parsed.config).unwrap();
    assert_eq!(
        config.to_json(),
        parsed.config,
        "a stored envelope config normalizes to itself"
    );

    let result = json!({"exitCode": 0, "signal": null, "timedOut": false, "stdout": "ok\n", "stderr": "",
        "metadata": {"commandId": "cmd-1"}});
    let parsed: ExecuteResult = serde_json::from_value(result.clone()).unwrap();
    assert_eq!(serde_json::to_value(parsed).unwrap(), result);

    let bad_lease = json!({"id": "x", "environmentId": "e", "status": "zombie", "leasePolicy": "ephemeral",
        "acquiredAt": "2026-05-11T10:00:00.000Z", "lastUsedAt": "2026-05-11T10:00:00.000Z",
        "createdAt": "2026-05-11T10:00:00.000Z", "updatedAt": "2026-05-11T10:00:00.000Z"});
    let err = serde_json::from_value::<EnvironmentLease>(bad_lease).unwrap_err();
    assert!(
        err.to_string()
            .contains("Unexpected environment lease status value: zombie")
    );
}
