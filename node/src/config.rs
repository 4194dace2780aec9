//! The node's TOML config (`node run --config FILE`). Its keys are the long
//! flags of `node run` with `_` for `-`; `meshtrain config default` writes
//! every one of them out with its default and help. Precedence: flags, then
//! `MESHTRAIN_<KEY>` environment variables, then the file, then defaults.
//!
//! The file is turned into flags placed before the command line's own, so
//! one parser (clap's) checks every value, and a flag given on the command
//! line overrides the file's.

use clap::Command;
use thiserror::Error;

#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("{file}: not TOML: {detail}")]
    Syntax { file: String, detail: String },
    #[error("{file}: unknown key `{key}` (see `meshtrain config default`)")]
    UnknownKey { file: String, key: String },
    #[error("{file}: `{key}` must be {expected}")]
    WrongType {
        file: String,
        key: String,
        expected: &'static str,
    },
}

/// The environment variable that sets the flag with this id.
pub fn env_name(id: &str) -> String {
    format!("MESHTRAIN_{}", id.to_uppercase())
}

/// Args of CMD that a config file may set.
fn settable(cmd: &Command) -> impl Iterator<Item = &clap::Arg> {
    cmd.get_arguments().filter(|a| {
        a.get_long().is_some() && !matches!(a.get_id().as_str(), "help" | "version" | "config" | "log_format")
    })
}

fn takes_value(arg: &clap::Arg) -> bool {
    !matches!(
        arg.get_action(),
        clap::ArgAction::SetTrue | clap::ArgAction::SetFalse | clap::ArgAction::Count
    )
}

/// Turns a config file into flags for CMD. Keys whose environment variable
/// is set (per `env_set`) are left to the environment.
pub fn file_args(
    file: &str,
    text: &str,
    cmd: &Command,
    env_set: impl Fn(&str) -> bool,
) -> Result<Vec<String>, ConfigError> {
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| ConfigError::Syntax {
        file: file.to_string(),
        detail: e.message().to_string(),
    })?;
    let mut args = Vec::new();
    for (key, value) in &table {
        let Some(arg) = settable(cmd).find(|a| a.get_id().as_str() == key) else {
            return Err(ConfigError::UnknownKey {
                file: file.to_string(),
                key: key.clone(),
            });
        };
        if env_set(&env_name(key)) {
            continue;
        }
        let flag = format!("--{}", arg.get_long().unwrap_or(key));
        let wrong = |expected| ConfigError::WrongType {
            file: file.to_string(),
            key: key.clone(),
            expected,
        };
        if !takes_value(arg) {
            match value {
                toml::Value::Boolean(true) => args.push(flag),
                toml::Value::Boolean(false) => {}
                _ => return Err(wrong("true or false")),
            }
            continue;
        }
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            toml::Value::Boolean(b) => Ok(b.to_string()),
            _ => Err(wrong("a string, a number or a list of them")),
        };
        match value {
            toml::Value::Array(items) => {
                for item in items {
                    args.push(flag.clone());
                    args.push(scalar(item)?);
                }
            }
            v => {
                args.push(flag);
                args.push(scalar(v)?);
            }
        }
    }
    Ok(args)
}

/// Every key of CMD's config with its default (or commented out, when it
/// has none) and its help as a comment.
pub fn default_toml(cmd: &Command) -> String {
    let mut out = String::from(
        "# meshtrain node config: `meshtrain node run --config FILE`.\n\
         # Flags override these, and MESHTRAIN_<KEY> environment variables override\n\
         # the file (MESHTRAIN_DATA_DIR for data_dir, ...).\n",
    );
    for arg in settable(cmd) {
        let id = arg.get_id().as_str();
        out.push('\n');
        if let Some(help) = arg.get_long_help().or(arg.get_help()) {
            for line in help.to_string().lines() {
                out.push_str(&format!("# {line}\n"));
            }
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let quoted = |v: &str| {
            if v.parse::<f64>().is_ok() {
                v.to_string()
            } else {
                format!("{v:?}")
            }
        };
        if !takes_value(arg) {
            out.push_str(&format!("{id} = false\n"));
        } else if arg.get_num_args().is_some_and(|n| n.max_values() > 1)
            || matches!(arg.get_action(), clap::ArgAction::Append)
        {
            let items: Vec<String> = defaults.iter().map(|v| quoted(v)).collect();
            out.push_str(&format!("{id} = [{}]\n", items.join(", ")));
        } else if let Some(v) = defaults.first() {
            out.push_str(&format!("{id} = {}\n", quoted(v)));
        } else {
            out.push_str(&format!("# {id} =\n"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn cmd() -> Command {
        Command::new("run")
            .arg(Arg::new("data_dir").long("data-dir").help("Where the data goes"))
            .arg(Arg::new("wait_peers").long("wait-peers").default_value("0"))
            .arg(Arg::new("bootstrap").long("bootstrap").action(ArgAction::Append))
            .arg(
                Arg::new("mdns")
                    .long("mdns")
                    .action(ArgAction::SetTrue)
                    .help("LAN discovery"),
            )
            .arg(Arg::new("config").long("config"))
    }

    #[test]
    fn turns_keys_into_flags() {
        let text = "data_dir = \"n\"\nwait_peers = 3\nbootstrap = [\"/ip4/1.2.3.4/tcp/1\", \"/ip4/1.2.3.5/tcp/1\"]\nmdns = true\n";
        let args = file_args("c.toml", text, &cmd(), |_| false).unwrap();
        assert_eq!(
            args,
            [
                "--bootstrap",
                "/ip4/1.2.3.4/tcp/1",
                "--bootstrap",
                "/ip4/1.2.3.5/tcp/1",
                "--data-dir",
                "n",
                "--mdns",
                "--wait-peers",
                "3"
            ]
        );
    }

    #[test]
    fn environment_wins_over_the_file() {
        let args = file_args("c.toml", "wait_peers = 3\n", &cmd(), |k| k == "MESHTRAIN_WAIT_PEERS").unwrap();
        assert!(args.is_empty());
    }

    #[test]
    fn names_unknown_keys_and_bad_values() {
        let e = file_args("c.toml", "wait_peer = 3\n", &cmd(), |_| false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.toml: unknown key `wait_peer` (see `meshtrain config default`)"
        );
        let e = file_args("c.toml", "config = \"x\"\n", &cmd(), |_| false).unwrap_err();
        assert!(matches!(e, ConfigError::UnknownKey { .. }), "{e}");
        let e = file_args("c.toml", "mdns = \"yes\"\n", &cmd(), |_| false).unwrap_err();
        assert!(matches!(e, ConfigError::WrongType { .. }), "{e}");
        let e = file_args("c.toml", "wait_peers = \n", &cmd(), |_| false).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
    }

    #[test]
    fn default_config_parses_back_to_the_defaults() {
        let text = default_toml(&cmd());
        assert!(text.contains("# Where the data goes\n# data_dir =\n"), "{text}");
        assert!(text.contains("wait_peers = 0\n"), "{text}");
        assert!(text.contains("bootstrap = []\n"), "{text}");
        assert!(text.contains("# LAN discovery\nmdns = false\n"), "{text}");
        let args = file_args("default", &text, &cmd(), |_| false).unwrap();
        assert_eq!(args, ["--wait-peers", "0"]);
    }
}
