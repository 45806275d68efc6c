//! `ncm-testkit-lease <port>`: tries to lease `port` (see `PortLease`) and prints `taken` or
//! `held`. Run by the testkit's own tests as another process.

fn main() -> std::process::ExitCode {
    let Some(port) = std::env::args().nth(1).and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: ncm-testkit-lease <port>");
        return std::process::ExitCode::from(2);
    };
    match ncm_cache_testkit::PortLease::take(port) {
        Ok(Some(_)) => println!("taken"),
        Ok(None) => println!("held"),
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::SUCCESS
}
