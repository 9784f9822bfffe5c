//! The check of every bulk NDJSON line (`fhir::ndjson::check_line`) beside serde_json doing the same
//! check (a `ResourceHead` from the line, the rest skipped), on the sandbox's resources of 200
//! patients, one line each, in memory: MB/s of NDJSON checked. `cargo bench --bench ndjson_check`.

use std::time::Instant;

use epic_export::fhir::bundle::ResourceHead;
use epic_export::fhir::ndjson::check_line;
use epic_export::sandbox::Dataset;

fn main() {
    let data = Dataset::generate(200, 7);
    let mut text = Vec::new();
    for id in data.patient_ids() {
        for t in epic_export::sandbox::SEARCH_TYPES {
            for r in data.resources(t, &id) {
                serde_json::to_writer(&mut text, &r).expect("a resource serialises");
                text.push(b'\n');
            }
        }
    }
    let lines: Vec<&[u8]> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .collect();
    let reps = (500_000_000 / text.len()).max(1);
    let measure = |name: &str, check: &dyn Fn(&[u8]) -> usize| {
        let mut best = 0f64;
        for _ in 0..3 {
            let start = Instant::now();
            let mut n = 0;
            for _ in 0..reps {
                for l in &lines {
                    n += check(l);
                }
            }
            let mb_s = (text.len() * reps) as f64 / start.elapsed().as_secs_f64() / 1e6;
            assert_eq!(n, lines.len() * reps, "every line passes");
            best = best.max(mb_s);
        }
        println!("{name:<12} {best:6.0} MB/s");
        best
    };
    println!(
        "{} lines, {:.1} MB, {reps} passes, best of 3:",
        lines.len(),
        text.len() as f64 / 1e6
    );
    let ours = measure("check_line", &|l| usize::from(check_line(l).is_ok()));
    let serde = measure("serde_json", &|l| {
        usize::from(serde_json::from_slice::<ResourceHead>(l).is_ok())
    });
    println!("RESULT ndjson check_mb_s={ours:.0} serde_mb_s={serde:.0}");
}
