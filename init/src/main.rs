//! argv -> mode -> run.

const USAGE: &str = "usage:
  spotinit                    run as PID 1 (the kernel starts it so)
  spotinit service            run under another init: volume (and Docker, if enabled)
  spotinit config check FILE  validate user data (TOML) before launching
  spotinit --version";

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    if std::process::id() == 1 {
        // The kernel may pass leftover command-line words as arguments: PID 1 ignores them.
        spotinit::run::pid1();
    }
    let code = match args.as_slice() {
        ["service"] => spotinit::run::service(),
        ["config", "check", file] => spotinit::run::config_check(file),
        ["--version"] | ["version"] => {
            println!("spotinit {}", env!("CARGO_PKG_VERSION"));
            0
        }
        _ => {
            eprintln!("{USAGE}");
            2
        }
    };
    std::process::exit(code);
}
