//! Command-line option groups shared by several `kiln` commands.
//!
//! Owns [`QuestArgs`] (`--quest-budget`, `--quest-page-size`, `--quest-skip-layers`) and its
//! validation into `QuestOptions`, and [`LayerArgs`] (`--layers`); later placement and
//! quantization groups go here too. It must not compile or run anything.

use anyhow::Result;
use clap::Args;
use kiln_ir::quest::QuestOptions;
use kiln_models::ModelConfig;

/// Which decoder layers of the model to keep.
#[derive(Args, Debug, Clone, Default)]
pub struct LayerArgs {
    /// Keep only the first N decoder layers (1 to the model's count): a model too large for
    /// this machine runs end to end with random weights, e.g. `--model mixtral-8x7b
    /// --layers 2`. Default: every layer.
    #[arg(long, value_name = "N")]
    pub layers: Option<usize>,
}

impl LayerArgs {
    /// Applies `--layers` to `config`; the error names the flag and the allowed range.
    pub fn apply(&self, config: &mut ModelConfig) -> Result<()> {
        if let Some(layers) = self.layers {
            config
                .keep_first_layers(layers)
                .map_err(|e| anyhow::anyhow!("--layers {layers}: {e}"))?;
        }
        Ok(())
    }
}

/// The Quest pass's flags.
#[derive(Args, Debug, Clone, Default)]
pub struct QuestArgs {
    /// Quest: tokens of KV cache attended per decode step, the current page included (turns
    /// the Quest pass on: decode attention of layers ≥ --quest-skip-layers reads only the
    /// pages with the highest query-aware scores; a positive multiple of the page size, at
    /// least two pages).
    #[arg(long, value_name = "TOKENS")]
    pub quest_budget: Option<usize>,
    /// Quest: tokens per KV-cache page, a power of two [default: 16].
    #[arg(long, value_name = "N")]
    pub quest_page_size: Option<usize>,
    /// Quest: the first N decoder layers keep dense attention [default: 2].
    #[arg(long, value_name = "N")]
    pub quest_skip_layers: Option<usize>,
}

impl QuestArgs {
    /// The Quest options of the flags: `None` without `--quest-budget` (the other two then
    /// must be absent), else the options with page size 16 and 2 skipped layers by default.
    /// Errors name the flag and what it expects.
    pub fn options(&self) -> Result<Option<QuestOptions>> {
        let (budget, page_size, skip_layers) = (
            self.quest_budget,
            self.quest_page_size,
            self.quest_skip_layers,
        );

        let Some(budget) = budget else {
            for (flag, value) in [
                ("--quest-page-size", page_size),
                ("--quest-skip-layers", skip_layers),
            ] {
                if value.is_some() {
                    anyhow::bail!("{flag} needs --quest-budget (Quest is on only with a budget)");
                }
            }
            return Ok(None);
        };
        let defaults = QuestOptions::default();
        let options = QuestOptions {
            budget_tokens: budget,
            page_size: page_size.unwrap_or(defaults.page_size),
            skip_layers: skip_layers.unwrap_or(defaults.skip_layers),
        };
        let page = options.page_size;
        let max = kiln_ir::quest::MAX_PAGE_SIZE;
        if page == 0 || page > max || !page.is_power_of_two() {
            anyhow::bail!("--quest-page-size {page}: expected a power of two in 1..={max}");
        }
        if budget == 0 || !budget.is_multiple_of(page) {
            anyhow::bail!(
                "--quest-budget {budget}: expected a positive multiple of the page size \
             (--quest-page-size {page})"
            );
        }
        if budget < 2 * page {
            anyhow::bail!(
                "--quest-budget {budget}: expected at least two pages ({} tokens with \
             --quest-page-size {page}): one chosen by score and the current page",
                2 * page
            );
        }
        options
            .validate()
            .map_err(|e| anyhow::anyhow!("--quest-budget/--quest-page-size: {e}"))?;
        Ok(Some(options))
    }
}
