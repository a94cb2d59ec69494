fn main() -> std::process::ExitCode {
    ferry::entry::main()
}
