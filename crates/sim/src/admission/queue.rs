//! The router's bounded queue of requests that wait for decode-side room, ordered by class
//! (critical, standard, sheddable, then requests without a budget) and, within a class, by the
//! deadline by which each must leave the queue to still meet its budget.

use std::collections::BTreeMap;

use super::budget::{Budget, Priority};

/// The order of a waiting request: class, then deadline (microseconds on the owner's clock), then
/// arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QueueKey {
    pub class: u8,
    pub deadline_us: u64,
    seq: u64,
}

/// Budgeted work by priority first; work without a TTFT budget last.
pub fn class(budget: &Budget) -> u8 {
    match (budget.ttft, budget.priority) {
        (None, _) => 3,
        (Some(_), Priority::Critical) => 0,
        (Some(_), Priority::Standard) => 1,
        (Some(_), Priority::Sheddable) => 2,
    }
}

/// What [`DeadlineQueue::push`] did.
#[derive(Debug, PartialEq)]
pub enum Pushed<T> {
    Queued(QueueKey),
    /// Queued, and the least urgent entry was pushed out to make room.
    Evicted(QueueKey, T),
    /// The queue is full of work at least as urgent: the item comes back.
    Full(T),
}

/// A bounded, ordered queue. A plain struct: its owner (the router's task, or the simulator)
/// drives it.
#[derive(Debug)]
pub struct DeadlineQueue<T> {
    entries: BTreeMap<QueueKey, T>,
    capacity: usize,
    seq: u64,
}

impl<T> DeadlineQueue<T> {
    pub fn new(capacity: usize) -> Self {
        DeadlineQueue {
            entries: BTreeMap::new(),
            capacity,
            seq: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues `item`; when full, it replaces the least urgent entry if it is more urgent.
    pub fn push(&mut self, class: u8, deadline_us: u64, item: T) -> Pushed<T> {
        self.seq += 1;
        let key = QueueKey {
            class,
            deadline_us,
            seq: self.seq,
        };
        if self.entries.len() < self.capacity {
            self.entries.insert(key, item);
            return Pushed::Queued(key);
        }
        match self.entries.last_key_value() {
            Some((&last, _)) if key < last => {
                let evicted = self.entries.remove(&last);
                self.entries.insert(key, item);
                match evicted {
                    Some(e) => Pushed::Evicted(key, e),
                    None => Pushed::Queued(key),
                }
            }
            _ => Pushed::Full(item),
        }
    }

    /// Entries in order.
    pub fn iter(&self) -> impl Iterator<Item = (&QueueKey, &T)> {
        self.entries.iter()
    }

    /// Whether an entry of a class before `class` waits.
    pub fn holds_before(&self, class: u8) -> bool {
        self.entries
            .first_key_value()
            .is_some_and(|(k, _)| k.class < class)
    }

    pub fn remove(&mut self, key: &QueueKey) -> Option<T> {
        self.entries.remove(key)
    }

    /// Removes and returns, in order, every entry `take` says to.
    pub fn take_where(
        &mut self,
        mut take: impl FnMut(&QueueKey, &T) -> bool,
    ) -> Vec<(QueueKey, T)> {
        let keys: Vec<QueueKey> = self
            .entries
            .iter()
            .filter(|(k, v)| take(k, v))
            .map(|(k, _)| *k)
            .collect();
        keys.into_iter()
            .filter_map(|k| self.entries.remove(&k).map(|v| (k, v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(ttft: Option<f64>, priority: Priority) -> Budget {
        Budget {
            ttft,
            itl: None,
            priority,
        }
    }

    #[test]
    fn order_is_class_then_deadline_then_arrival() {
        let mut q = DeadlineQueue::new(8);
        let crit = class(&budget(Some(1.0), Priority::Critical));
        let std = class(&budget(Some(1.0), Priority::Standard));
        let shed = class(&budget(Some(1.0), Priority::Sheddable));
        let none = class(&budget(None, Priority::Critical));
        q.push(none, 1, "unbudgeted");
        q.push(shed, 5, "sheddable");
        q.push(std, 900, "standard late");
        q.push(std, 100, "standard early");
        q.push(crit, 10_000, "critical");
        q.push(std, 100, "standard early, second");
        let order: Vec<&str> = q.iter().map(|(_, v)| *v).collect();
        assert_eq!(
            order,
            [
                "critical",
                "standard early",
                "standard early, second",
                "standard late",
                "sheddable",
                "unbudgeted"
            ]
        );
        assert!(q.holds_before(std));
        assert!(!q.holds_before(crit));
    }

    #[test]
    fn a_full_queue_sheds_its_least_urgent_entry_or_refuses() {
        let mut q = DeadlineQueue::new(2);
        assert!(matches!(q.push(1, 50, "a"), Pushed::Queued(_)));
        assert!(matches!(q.push(2, 10, "shed"), Pushed::Queued(_)));
        // A standard request pushes the sheddable one out.
        assert!(matches!(q.push(1, 60, "b"), Pushed::Evicted(_, "shed")));
        // A later standard one finds only more urgent work: refused.
        assert_eq!(q.push(1, 70, "c"), Pushed::Full("c"));
        assert_eq!(q.len(), 2);
        let taken = q.take_where(|k, _| k.deadline_us < 55);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].1, "a");
        assert_eq!(q.len(), 1);
    }
}
