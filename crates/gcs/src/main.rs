use clap::Parser;

fn main() -> std::process::ExitCode {
    gcs::cli::main(gcs::cli::Args::parse())
}
