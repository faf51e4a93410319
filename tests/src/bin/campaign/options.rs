//! The command line: how many runs of each kind.

use crate::Outcome;

pub struct Options {
    pub kills: usize,
    pub graceful: usize,
    pub races: usize,
    pub moves: usize,
}

pub const USAGE: &str = "usage: campaign [--kills N] [--graceful N] [--races N] [--moves N] \
                     (defaults 20 10 10 3)";

pub fn parse_options(args: &[String]) -> Outcome<Options> {
    let mut o = Options {
        kills: 20,
        graceful: 10,
        races: 10,
        moves: 3,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let slot = match flag.as_str() {
            "--kills" => &mut o.kills,
            "--graceful" => &mut o.graceful,
            "--races" => &mut o.races,
            "--moves" => &mut o.moves,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        };
        *slot = it
            .next()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{flag} wants a count"))?;
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_with_defaults() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = parse_options(&args(&["--kills", "3", "--moves", "1"])).unwrap();
        assert_eq!((o.kills, o.graceful, o.races, o.moves), (3, 10, 10, 1));
        assert!(parse_options(&args(&["--kills"])).is_err());
        assert!(parse_options(&args(&["--nope"])).is_err());
    }
}
