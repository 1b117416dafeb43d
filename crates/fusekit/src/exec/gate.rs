//! Admission by memory: methods that hold whole matrices (the SVD merges) declare how many bytes
//! a tensor keeps while it is merged, and a tensor starts only while the declared bytes of those
//! running fit the budget. Streaming methods declare nothing and never wait. A tensor larger than
//! the whole budget runs alone: the least memory it can be merged in.

use std::sync::{Condvar, Mutex};

pub struct MemoryGate {
    budget: usize,
    held: Mutex<usize>,
    released: Condvar,
}

/// Bytes admitted through the gate, given back when dropped.
pub struct Admitted<'a> {
    gate: &'a MemoryGate,
    bytes: usize,
}

impl MemoryGate {
    pub fn new(budget: usize) -> MemoryGate {
        MemoryGate {
            budget,
            held: Mutex::new(0),
            released: Condvar::new(),
        }
    }

    /// Waits until `bytes` fit beside what is held (or nothing is held), then holds them.
    pub fn admit(&self, bytes: usize) -> Admitted<'_> {
        let bytes = bytes.min(self.budget);
        if bytes == 0 {
            return Admitted { gate: self, bytes };
        }
        let mut held = self.held.lock().expect("gate lock");
        while *held > 0 && *held + bytes > self.budget {
            held = self.released.wait(held).expect("gate lock");
        }
        *held += bytes;
        Admitted { gate: self, bytes }
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut held = self.gate.held.lock().expect("gate lock");
        *held -= self.bytes;
        self.gate.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn admitted_bytes_never_exceed_the_budget() {
        let gate = MemoryGate::new(100);
        let (now, peak) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let sizes = [40, 70, 30, 100, 250, 10, 60, 0, 90, 20];
        std::thread::scope(|s| {
            for (i, &bytes) in sizes.iter().cycle().take(40).enumerate() {
                let (gate, now, peak) = (&gate, &now, &peak);
                s.spawn(move || {
                    let _admitted = gate.admit(bytes);
                    let held = now.fetch_add(bytes.min(100), Ordering::SeqCst) + bytes.min(100);
                    peak.fetch_max(held, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_micros(200 + 37 * (i as u64 % 5)));
                    now.fetch_sub(bytes.min(100), Ordering::SeqCst);
                });
            }
        });
        assert!(peak.load(Ordering::SeqCst) <= 100, "{peak:?}");
        assert_eq!(*gate.held.lock().unwrap(), 0);
    }
}
