//! The controller's clock: what every reconcile pass takes as "now" (schedules, key rotation waits,
//! condition transition times). The system clock in production; tests use a [`Clock::manual`] one
//! they set and advance.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;

/// Where "now" comes from.
#[derive(Clone, Default)]
pub struct Clock {
    /// `None`: the system clock.
    manual: Option<Arc<Mutex<Timestamp>>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock that stands at `at` until it is [`set`](Clock::set) or [`advance`](Clock::advance)d;
    /// its clones share the time.
    pub fn manual(at: Timestamp) -> Clock {
        Clock {
            manual: Some(Arc::new(Mutex::new(at))),
        }
    }

    pub fn now(&self) -> Timestamp {
        match &self.manual {
            None => Timestamp::now(),
            Some(at) => *at.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }

    /// Sets a manual clock to `at` (the system clock cannot be set: nothing happens).
    pub fn set(&self, at: Timestamp) {
        if let Some(t) = &self.manual {
            *t.lock().unwrap_or_else(|p| p.into_inner()) = at;
        }
    }

    /// Moves a manual clock on by `by`, saturating at the latest representable time.
    pub fn advance(&self, by: Duration) {
        if let Some(t) = &self.manual {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            *t = t.checked_add(by).unwrap_or(Timestamp::MAX);
        }
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.manual {
            None => f.write_str("Clock::system()"),
            Some(_) => write!(f, "Clock::manual({})", self.now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_is_shared_by_its_clones_and_moves_only_when_told() {
        let start = Timestamp::from_second(1_800_000_000).unwrap();
        let clock = Clock::manual(start);
        let copy = clock.clone();
        assert_eq!(copy.now(), start);
        clock.advance(Duration::from_secs(90));
        assert_eq!(
            copy.now(),
            start.checked_add(Duration::from_secs(90)).unwrap()
        );
        copy.set(start);
        assert_eq!(clock.now(), start);
        clock.advance(Duration::MAX);
        assert_eq!(clock.now(), Timestamp::MAX);
        let system = Clock::system();
        system.set(Timestamp::MIN);
        assert!(system.now() > Timestamp::MIN);
    }
}
