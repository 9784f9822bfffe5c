//! The command line: clap definitions and dispatch. `main.rs` only calls `cli::main`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::auth::{Algorithm, SigningKey, keys};
use crate::export::ExportError;
use crate::logging::{self, LogFormat};
use crate::summary::NotificationStatus;

/// Exit code of a run that stopped early on purpose and will be resumed by the next run.
pub const EXIT_UNFINISHED: u8 = 4;

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
    /// Address of /healthz and /readyz.
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
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
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
            Ok(report.summary.outcome.exit_code() as u8)
        }
        Command::Run {
            config,
            no_progress,
        } => run_once(&config, !no_progress).await,
        Command::Schedule {
            config,
            cron,
            time_zone,
            grace_seconds,
        } => {
            let from_config = crate::config::load_schedule(&config)?;
            let (expr, zone, deadline) = match (cron, from_config) {
                (Some(c), from) => (c, time_zone.or(from.and_then(|f| f.time_zone)), None),
                (None, Some(f)) => (
                    f.cron,
                    time_zone.or(f.time_zone),
                    f.starting_deadline_seconds,
                ),
                (None, None) if is_ini(&config) => {
                    // The original tool's scheduler ran the export daily; keep that, at 02:00 local
                    // time, unless told otherwise.
                    let zone = time_zone
                        .or_else(|| jiff::tz::TimeZone::system().iana_name().map(str::to_owned));
                    tracing::info!(
                        "{} has no [schedule]: running daily at 02:00 ({}); set [schedule] cron = ... or pass --cron to change it",
                        config.display(),
                        zone.as_deref().unwrap_or("UTC")
                    );
                    ("0 2 * * *".to_owned(), zone, None)
                }
                (None, None) => anyhow::bail!(
                    "{}: no schedule: add `schedule: {{cron: \"0 2 * * *\", timeZone: America/Chicago}}` to the config, or pass --cron",
                    config.display()
                ),
            };
            let schedule = crate::schedule::Schedule::parse(&expr, zone.as_deref())
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            tokio::spawn(async move {
                terminated().await;
                let _ = stop_tx.send(true);
            });
            crate::scheduler::run(
                crate::scheduler::SchedulerOptions {
                    config,
                    schedule,
                    deadline: deadline
                        .map(std::time::Duration::from_secs)
                        .unwrap_or(crate::scheduler::DEFAULT_DEADLINE),
                    grace: std::time::Duration::from_secs(grace_seconds),
                },
                stop_rx,
            )
            .await
        }
        Command::Check { config } => {
            let plan = crate::config::load_plan(&config)?;
            match crate::check::check(&plan).await {
                Ok(report) => {
                    print!("{report}");
                    Ok(0)
                }
                Err(report) => {
                    print!("{report}");
                    Ok(1)
                }
            }
        }
        Command::Keygen {
            alg,
            out,
            k8s_secret,
            namespace,
            secret_key,
        } => {
            if !matches!(alg, Algorithm::RS384 | Algorithm::ES384) {
                anyhow::bail!(
                    "--alg must be RS384 or ES384 (the algorithms SMART requires clients to support)"
                );
            }
            let target = k8s_secret.map(|name| crate::keygen::SecretTarget {
                name,
                namespace,
                key: secret_key.unwrap_or_else(|| crate::keygen::DEFAULT_SECRET_KEY.to_owned()),
            });
            let key = SigningKey::generate(alg)?;
            match (out, &target) {
                (Some(dir), _) => {
                    let written = crate::keygen::write_files(&key, &dir, target.as_ref())?;
                    println!(
                        "private key: {} (mode 0600; keep it secret)",
                        written.private.display()
                    );
                    println!(
                        "public JWKS: {} (register it with Epic or host it at your JWK Set URL)",
                        written.jwks.display()
                    );
                    if let Some(secret) = &written.secret {
                        println!(
                            "Kubernetes Secret: {} (mode 0600; `kubectl apply -f` it)",
                            secret.display()
                        );
                    }
                    println!("kid: {}", key.kid());
                }
                (None, Some(target)) => {
                    use std::io::{IsTerminal, Write};
                    let manifest = crate::keygen::secret_manifest(&key, target)?;
                    let mut stdout = std::io::stdout().lock();
                    if stdout.is_terminal() {
                        eprintln!(
                            "note: this manifest holds the private key; pipe it to `kubectl apply -f -` or add --out DIR to write it to a 0600 file"
                        );
                    }
                    stdout
                        .write_all(manifest.as_bytes())
                        .and_then(|()| stdout.flush())
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "cannot write the Secret manifest to stdout: {e}; the key was not kept anywhere, run keygen again"
                            )
                        })?;
                    eprintln!("kid: {}", key.kid());
                    eprintln!(
                        "public JWKS (register it with Epic or host it at your JWK Set URL; `epic-export jwks --key FILE` prints it again from the key):\n{}",
                        serde_json::to_string_pretty(&keys::jwks(std::slice::from_ref(&key)))?
                    );
                }
                (None, None) => anyhow::bail!("keygen needs --out DIR, --k8s-secret NAME or both"),
            }
            Ok(0)
        }
        Command::Jwks { key, kid } => {
            let keys = crate::keygen::load_distinct(&key, &kid)?;
            println!("{}", serde_json::to_string_pretty(&keys::jwks(&keys))?);
            Ok(0)
        }
        Command::Job { termination_log } => Ok(crate::operator::run_job(&termination_log).await),
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
            crate::operator::serve_controller(client, options, terminated()).await
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
            crate::operator::serve_jwks_server(client, options, terminated()).await
        }
        Command::Crd => {
            print!("{}", crate::operator::crd::crd_yaml());
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

fn is_ini(path: &std::path::Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("ini"))
}

/// One export run from a config file (YAML or the original INI), as `epic-export run` does and each
/// run of `epic-export schedule`. Returns the exit code.
pub async fn run_once(config: &std::path::Path, interactive: bool) -> anyhow::Result<u8> {
    let plan = crate::config::load_plan(config)?;
    let options = crate::export::RunOptions { interactive };
    let started_at = jiff::Timestamp::now();
    let started = std::time::Instant::now();
    match crate::export::run(&plan, &options).await {
        Ok(mut report) => {
            // Best-effort: the outcome and exit code stay what the export decided.
            let result = crate::notify::notify_run(plan.email.as_ref(), &report.summary).await;
            if let Some(record) = result.record() {
                report.summary.notification = Some(NotificationStatus {
                    email: Some(record),
                });
                let path = report.dir.join("summary.json");
                if let Err(e) = crate::output::write_json_atomic(&path, &report.summary) {
                    tracing::warn!("cannot record the notification in {}: {e}", path.display());
                }
            }
            let summary = &report.summary;
            println!("{}", summary.render_table());
            // The original tool's closing log lines: each file with its records and size.
            for r in &summary.resources {
                tracing::info!(
                    file = %r.file,
                    records = r.records,
                    bytes = r.bytes,
                    "{}: {} records, {}",
                    r.file,
                    r.records,
                    crate::summary::human_bytes(r.bytes)
                );
            }
            tracing::info!(
                outcome = ?summary.outcome,
                records = summary.records_total,
                bytes = summary.bytes_total,
                "export {} finished: {} records, {} in {}",
                summary.export,
                summary.records_total,
                crate::summary::human_bytes(summary.bytes_total),
                summary.output_dir
            );
            Ok(summary.outcome.exit_code() as u8)
        }
        Err(ExportError::Unfinished(why)) => {
            eprintln!("unfinished: {why}");
            Ok(EXIT_UNFINISHED)
        }
        Err(e) => {
            // Nothing was written (key, authentication, output folder); still report the failure
            // if asked to. There is no summary.json to record the result in.
            if plan.email.is_some() {
                let summary = crate::notify::summary_of_failed_start(
                    &plan,
                    started_at,
                    started.elapsed().as_secs_f64(),
                    &e.to_string(),
                );
                let _ = crate::notify::notify_run(plan.email.as_ref(), &summary).await;
            }
            Err(e.into())
        }
    }
}

/// Completes on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}
