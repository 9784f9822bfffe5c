//! The command line: clap definitions, and dispatch to the commands (`run`, `scheduler`, `demo`,
//! `check`, `keygen`, `operator`, `sandbox`), turning their typed errors into a message and an exit
//! code. Parsing and wiring only: `main.rs` calls `cli::main`, and nothing calls back into `cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::auth::Algorithm;
use crate::logging::{self, LogFormat};
use crate::run::EXIT_FAILED;

#[derive(Parser, Debug)]
#[command(
    name = "epic-export",
    version,
    about = "Export patient data from Epic over FHIR (SMART Backend Services) to NDJSON"
)]
pub struct Cli {
    /// Log line format on stderr (filter with RUST_LOG, e.g. RUST_LOG=debug).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Also write the log to this file, rotated daily (FILE.YYYY-MM-DD). With an INI config the
    /// default is the original tool's backend_epic.log (or its [paths] log_file).
    #[arg(long, global = true, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the whole flow offline against the built-in sandbox.
    Demo {
        /// Folder for the demo's key, config and output.
        #[arg(long, default_value = "epic-export-demo")]
        out: PathBuf,
        /// Synthetic patients in the sandbox (all exported).
        #[arg(long, default_value_t = 20)]
        patients: usize,
        /// Run a Bulk Data Group export instead of per-patient searches.
        #[arg(long)]
        bulk: bool,
    },
    /// One export run from a config file. Exit codes: 0 success, 3 partial, 4 unfinished (a bulk
    /// export still being prepared or interrupted: the next run resumes it), 1 failed.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// No progress bar even on a terminal.
        #[arg(long)]
        no_progress: bool,
    },
    /// Run the export on a schedule: `schedule.cron` in `schedule.timeZone` from the config (or
    /// --cron), one run at a time; a run missed while stopped is made up at start if at most
    /// `schedule.startingDeadlineSeconds` (default 3600) late. SIGTERM/Ctrl-C lets the current run
    /// finish, or abandons it cleanly after --grace-seconds.
    Schedule {
        #[arg(long, short)]
        config: PathBuf,
        /// Cron expression (5 fields or @daily…), instead of the config's `schedule.cron`.
        #[arg(long)]
        cron: Option<String>,
        /// IANA time zone of the cron expression, instead of the config's `schedule.timeZone`.
        #[arg(long)]
        time_zone: Option<String>,
        /// Seconds a run may go on after a stop request before it is abandoned.
        #[arg(long, default_value_t = 300)]
        grace_seconds: u64,
    },
    /// Validate the config and key, get a token, and explain any failure (never prints the token).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Make a new private key (DIR/private.pem, mode 0600) and the JWKS to register (DIR/jwks.json);
    /// with --k8s-secret also a Kubernetes Secret manifest holding the key (DIR/NAME.secret.yaml, or
    /// stdout without --out: `epic-export keygen --k8s-secret epic-key | kubectl apply -f -`).
    Keygen {
        #[arg(long, default_value = "RS384")]
        alg: Algorithm,
        /// Folder to write the files into (never overwriting); optional with --k8s-secret.
        #[arg(long, value_name = "DIR", required_unless_present = "k8s_secret")]
        out: Option<PathBuf>,
        /// Emit a Kubernetes Secret (type Opaque) named NAME holding the private key, annotated
        /// with its kid (fhirexport.dev/kid).
        #[arg(long, value_name = "NAME", value_parser = crate::keygen::parse_secret_name)]
        k8s_secret: Option<String>,
        /// metadata.namespace of the Secret (default: none, kubectl's current namespace).
        #[arg(long, value_name = "NS", requires = "k8s_secret", value_parser = crate::keygen::parse_namespace)]
        namespace: Option<String>,
        /// The Secret's data key holding the PEM [default: private.pem]. To rotate, stage the next
        /// key under next-private.pem in the same Secret.
        #[arg(long, value_name = "KEY", requires = "k8s_secret", value_parser = crate::keygen::parse_secret_key)]
        secret_key: Option<String>,
    },
    /// Print one public JWK Set for existing private keys (to host at a JWK Set URL); several keys
    /// (`--key a.pem b.pem` or `--key a.pem --key b.pem`) publish a rotation's old and new key.
    Jwks {
        #[arg(long, required = true, num_args = 1..)]
        key: Vec<PathBuf>,
        /// The kid of each key, in --key order, when the config sets auth.keyId (default: the
        /// RFC 7638 thumbprint, as auth.keyId's default).
        #[arg(long, num_args = 1..)]
        kid: Vec<String>,
    },
    /// What an export Job's pod runs: the config from $EPIC_EXPORT_JOB, one run, the report in the
    /// termination message.
    Job {
        #[arg(long, default_value = "/dev/termination-log")]
        termination_log: PathBuf,
    },
    /// Print the EpicExport CustomResourceDefinition (YAML), as committed in crds/epicexport.yaml.
    Crd,
    /// Run the Kubernetes operator: reconcile EpicExports into export Jobs (in-cluster config or
    /// KUBECONFIG).
    Controller(ControllerArgs),
    /// Serve the JWK Set endpoint (`/jwks/<namespace>/<export>.json`) from the public keys the
    /// controller publishes in the EpicExports' status; needs only get/list/watch on EpicExports.
    JwksServer(JwksServerArgs),
    /// Run the Epic-compatible sandbox server.
    Sandbox(crate::sandbox::SandboxArgs),
}

#[derive(clap::Args, Debug)]
pub struct ControllerArgs {
    /// Image of the export Jobs (unless an EpicExport sets spec.job.image): the operator's own.
    #[arg(long, env = "EPIC_EXPORT_IMAGE")]
    pub image: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: std::net::SocketAddr,
    /// Act only while holding a coordination.k8s.io Lease (needed with more than one replica).
    #[arg(long, env = "LEADER_ELECT", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub leader_elect: bool,
    /// Namespace of the Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// This replica's name in the Lease and in Events (default: the host name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// The `Cache-Control` max-age, in seconds, that the JWK Set server (`jwks-server --max-age`)
    /// sends: a key rotation waits this long (plus a margin) after publishing the next key before
    /// signing with it.
    #[arg(long, env = "JWKS_MAX_AGE", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=104_400))]
    pub jwks_max_age: u64,
    /// Images export Jobs may run besides --image, comma-separated: exact references, or prefixes
    /// ending in `*` (e.g. `registry.example.org/epic-export@sha256:*`). An EpicExport whose
    /// spec.job.image is not allowed is Stalled.
    #[arg(long, env = "ALLOWED_JOB_IMAGES", value_delimiter = ',')]
    pub allowed_job_images: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct JwksServerArgs {
    /// Address of the JWK Set endpoint (`/jwks/...` only; no authentication, public keys only).
    #[arg(long, env = "JWKS_ADDR", default_value = "0.0.0.0:8081")]
    pub addr: std::net::SocketAddr,
    /// Address of /healthz, /readyz and /metrics (the JWK Set requests by result).
    #[arg(long, env = "HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: std::net::SocketAddr,
    /// Serve only the EpicExports of this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// Cache-Control max-age of the JWK Set, in seconds (the controller's --jwks-max-age must be the
    /// same: a key rotation waits this long).
    #[arg(long, env = "JWKS_MAX_AGE", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..=104_400))]
    pub max_age: u64,
    /// Cache-Control max-age while a rotation publishes a next or retiring key, in seconds.
    #[arg(long, env = "JWKS_ROTATION_MAX_AGE", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=104_400))]
    pub rotation_max_age: u64,
}

/// Process-wide settings for a tool that writes PHI: every file it creates is `0600` and every folder
/// `0700` (umask 077; log files and state files included), and a file-size limit (`ulimit -f`) makes
/// a write fail with `EFBIG`, reported like a full disk, instead of killing the process with SIGXFSZ.
fn harden_process() {
    // SAFETY: umask and signal have no preconditions; they run before any thread is started.
    unsafe {
        libc::umask(0o077);
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Parses arguments, runs the command, and returns the process exit code.
pub fn main() -> ExitCode {
    harden_process();
    let cli = Cli::parse();
    let log_file = cli.log_file.clone().or_else(|| match &cli.command {
        Command::Run { config, .. } | Command::Schedule { config, .. } => {
            crate::config::ini::log_file(config)
        }
        _ => None,
    });
    if let Err(e) = logging::init(cli.log_format, log_file.as_deref()) {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", message(e.as_ref()));
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// The error and its causes in one line; a cause the message already quotes is not repeated.
fn message(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

async fn dispatch(command: Command) -> anyhow::Result<u8> {
    match command {
        Command::Demo {
            out,
            patients,
            bulk,
        } => {
            let report = crate::demo::run(&crate::demo::DemoOptions {
                out,
                patients,
                bulk,
                interactive: true,
            })
            .await?;
            println!("\n{}", report.summary.render_table());
            Ok(report.summary.outcome.exit_code())
        }
        Command::Run {
            config,
            no_progress,
        } => {
            let outcome = crate::run::run_config_file(&config, !no_progress).await?;
            outcome.report();
            Ok(outcome.exit_code())
        }
        Command::Schedule {
            config,
            cron,
            time_zone,
            grace_seconds,
        } => {
            let options = crate::scheduler::resolve(
                &config,
                cron,
                time_zone,
                std::time::Duration::from_secs(grace_seconds),
            )?;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                crate::task::terminated().await;
                let _ = stop_tx.send(true);
            });
            Ok(crate::scheduler::run(options, stop_rx).await?)
        }
        Command::Check { config } => {
            let plan = crate::config::load_plan(&config)?;
            let report = crate::check::check(&plan).await;
            print!("{}", report.text);
            Ok(if report.passed { 0 } else { EXIT_FAILED })
        }
        Command::Keygen {
            alg,
            out,
            k8s_secret,
            namespace,
            secret_key,
        } => {
            let target = k8s_secret.map(|name| crate::keygen::SecretTarget {
                name,
                namespace,
                key: secret_key.unwrap_or_else(|| crate::keygen::DEFAULT_SECRET_KEY.to_owned()),
            });
            crate::keygen::keygen(alg, out.as_deref(), target.as_ref())?;
            Ok(0)
        }
        Command::Jwks { key, kid } => {
            crate::keygen::print_jwks(&key, &kid)?;
            Ok(0)
        }
        Command::Job { termination_log } => Ok(crate::run::run_job(&termination_log).await),
        Command::Controller(args) => {
            let identity = args
                .identity
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| format!("epic-export-{}", std::process::id()));
            let images =
                crate::operator::images::ImagePolicy::new(&args.image, &args.allowed_job_images)?;
            let client = kube_client().await?;
            let mut settings = crate::operator::controller::Settings::new(images);
            settings.namespace = args.namespace;
            settings.identity = identity.clone();
            settings.rotation.cache_lifetime = std::time::Duration::from_secs(args.jwks_max_age);
            let options = crate::operator::ControllerOptions {
                settings,
                http_addr: Some(args.metrics_addr),
                leader_election: args.leader_elect.then(|| {
                    crate::operator::lease::LeaseSettings::new(args.lease_namespace, identity)
                }),
            };
            Ok(crate::operator::run_controller(client, options, crate::task::terminated()).await?)
        }
        Command::JwksServer(args) => {
            let client = kube_client().await?;
            let options = crate::operator::JwksServerOptions {
                addr: args.addr,
                health_addr: Some(args.health_addr),
                namespace: args.namespace,
                settings: crate::operator::jwks::JwksSettings {
                    max_age: std::time::Duration::from_secs(args.max_age),
                    rotation_max_age: std::time::Duration::from_secs(args.rotation_max_age),
                },
            };
            Ok(
                crate::operator::run_jwks_server(client, options, crate::task::terminated())
                    .await?,
            )
        }
        Command::Crd => {
            print!("{}", crate::operator::crd::crd_yaml()?);
            Ok(0)
        }
        Command::Sandbox(args) => {
            crate::sandbox::serve(args).await?;
            Ok(0)
        }
    }
}

/// The Kubernetes client of `controller` and `jwks-server` (in-cluster config or KUBECONFIG).
async fn kube_client() -> anyhow::Result<kube::Client> {
    kube::Client::try_default().await.map_err(|e| {
        anyhow::anyhow!(
            "cannot reach the Kubernetes API: {e} (in a pod, check the ServiceAccount; outside, KUBECONFIG)"
        )
    })
}
