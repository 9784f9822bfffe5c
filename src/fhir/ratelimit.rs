//! A requests-per-second limit shared by every task of a run: each request takes the next free slot.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

pub struct RateLimiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    /// At most `per_second` requests a second; a rate that is not a positive number is taken as one
    /// request an hour rather than a panic (the config refuses such values first).
    pub fn new(per_second: f64) -> Self {
        let interval =
            Duration::try_from_secs_f64(1.0 / per_second).unwrap_or(Duration::from_secs(3600));
        RateLimiter {
            interval: interval.min(Duration::from_secs(3600)),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for this request's slot.
    pub async fn wait(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot.checked_add(self.interval).unwrap_or(slot);
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spaces_requests() {
        let rl = RateLimiter::new(10.0);
        let start = Instant::now();
        for _ in 0..11 {
            rl.wait().await;
        }
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
