fn main() -> std::process::ExitCode {
    epic_export::cli::main()
}
