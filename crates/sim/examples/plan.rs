//! `tandem plan` before the binary wires it in: `cargo run --release -p tandem-sim --example plan -- --help`.

use clap::Parser;
use tandem_sim::{PlanArgs, run_plan};

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    plan: PlanArgs,
}

fn main() {
    let cli = Cli::parse();
    match run_plan(&cli.plan) {
        Ok(out) => print!("{out}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}
