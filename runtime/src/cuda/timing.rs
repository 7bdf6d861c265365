//! Timing device work with CUDA events.
//!
//! Owns [`Event`] (record on the device's stream, elapsed time between two) and
//! [`CudaDevice::time`] with its [`Timing`] summary. Times are device times between events,
//! never host wall-clock. It must not decide what to time or print reports (that is the bench
//! harness).

use super::device::CudaDevice;
use super::error::CudaError;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use std::sync::Arc;

/// A timing-enabled CUDA event on a device's stream.
#[derive(Debug)]
pub struct Event {
    event: CudaEvent,
    stream: Arc<CudaStream>,
}

impl Event {
    /// Records the point reached by the work queued so far.
    pub fn record(&self) -> Result<(), CudaError> {
        self.event
            .record(&self.stream)
            .map_err(CudaError::driver("cuEventRecord"))
    }

    /// Milliseconds of device time from `self` to `end`; waits for both to complete.
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32, CudaError> {
        self.event
            .elapsed_ms(&end.event)
            .map_err(CudaError::driver("cuEventElapsedTime"))
    }
}

/// Summary of repeated timings, in milliseconds of device time.
#[derive(Clone, Debug, PartialEq)]
pub struct Timing {
    /// The median sample (the mean of the middle two for an even count).
    pub median_ms: f64,
    /// The fastest sample.
    pub min_ms: f64,
    /// The mean of the samples.
    pub mean_ms: f64,
    /// One per timed iteration, in the order they ran.
    pub samples: Vec<f64>,
}

impl Timing {
    /// The summary of `samples`; `None` when there are none.
    pub fn from_samples(samples: Vec<f64>) -> Option<Timing> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.clone();
        sorted.sort_by(f64::total_cmp);
        let mid = sorted.len() / 2;
        let median_ms = if sorted.len() % 2 == 1 {
            sorted[mid]
        } else {
            (sorted[mid - 1] + sorted[mid]) / 2.0
        };
        Some(Timing {
            median_ms,
            min_ms: sorted[0],
            mean_ms: sorted.iter().sum::<f64>() / sorted.len() as f64,
            samples,
        })
    }
}

impl CudaDevice {
    /// A new timing event on this device's stream.
    pub fn event(&self) -> Result<Event, CudaError> {
        let event = self
            .ctx
            .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(CudaError::driver("cuEventCreate"))?;
        Ok(Event {
            event,
            stream: self.stream.clone(),
        })
    }

    /// Runs `work` `warmup` times untimed, then `iterations` times, each between two events
    /// on this device's stream, and summarises the device times.
    ///
    /// `work` should only queue device work (launches, copies) on this device. Each sample
    /// includes any time the device sat idle waiting for the host to queue the work.
    pub fn time(
        &self,
        mut work: impl FnMut() -> Result<(), CudaError>,
        warmup: usize,
        iterations: usize,
    ) -> Result<Timing, CudaError> {
        if iterations == 0 {
            return Err(CudaError::InvalidRequest(
                "CudaDevice::time needs at least one timed iteration".to_string(),
            ));
        }
        for _ in 0..warmup {
            work()?;
        }
        let events = (0..2 * iterations)
            .map(|_| self.event())
            .collect::<Result<Vec<_>, _>>()?;
        for pair in events.chunks_exact(2) {
            pair[0].record()?;
            work()?;
            pair[1].record()?;
        }
        self.synchronize()?;
        let samples = events
            .chunks_exact(2)
            .map(|pair| pair[0].elapsed_ms(&pair[1]).map(f64::from))
            .collect::<Result<Vec<_>, _>>()?;
        Timing::from_samples(samples)
            .ok_or_else(|| CudaError::InvalidRequest("no timing samples were taken".to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_statistics() {
        let t = Timing::from_samples(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((t.median_ms, t.min_ms, t.mean_ms), (2.0, 1.0, 2.0));
        assert_eq!(t.samples, vec![3.0, 1.0, 2.0]);
        let t = Timing::from_samples(vec![4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(t.median_ms, 2.5);
        assert!(Timing::from_samples(vec![]).is_none());
    }
}
