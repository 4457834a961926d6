// Example: the three regions of the local simulation (scripts/run), on Azure. uksouth serves from provisioned
// throughput (PTU) at priority 1; swedencentral and francecentral serve pay-as-you-go at priority 2 and take the
// overflow when the PTU is saturated or failing. Check model, version and SKU availability in each region and your
// quota before deploying (docs/deploy.md); change or add regions freely.
using './main.bicep'

// azd sets AZURE_ENV_NAME; with az deployment group create, export it or keep the default.
param environmentName = readEnvironmentVariable('AZURE_ENV_NAME', 'aigw')

// The admin who runs `python -m shared.admin` (granted Storage Table Data Contributor and Monitoring Reader): your
// object id, for example `export AZURE_PRINCIPAL_ID=$(az ad signed-in-user show --query id -o tsv)`, or with azd
// `azd env set AZURE_PRINCIPAL_ID ...`. Empty grants nothing.
param adminPrincipalId = readEnvironmentVariable('AZURE_PRINCIPAL_ID', '')

param backendRegions = [
  {
    id: 'uksouth-ptu'
    location: 'uksouth'
    priority: 1
    weight: 1
    // Regional provisioned throughput: capacity is in PTUs (gpt-4o: minimum 50, steps of 50; gpt-4o-mini: 25).
    sku: 'ProvisionedManaged'
    reserveTokens: 20000
    deployments: [
      {
        name: 'gpt-4o'
        model: 'gpt-4o'
        modelVersion: '2024-11-20'
        capacity: 50
      }
      {
        name: 'gpt-4o-mini'
        model: 'gpt-4o-mini'
        modelVersion: '2024-07-18'
        capacity: 25
      }
    ]
  }
  {
    id: 'swedencentral'
    location: 'swedencentral'
    priority: 2
    weight: 1
    // Standard (regional, pay-as-you-go): capacity is in thousands of tokens per minute.
    sku: 'Standard'
    deployments: [
      {
        name: 'gpt-4o'
        model: 'gpt-4o'
        modelVersion: '2024-11-20'
        capacity: 150
      }
      {
        name: 'gpt-4o-mini'
        model: 'gpt-4o-mini'
        modelVersion: '2024-07-18'
        capacity: 150
      }
      {
        name: 'text-embedding-3-small'
        model: 'text-embedding-3-small'
        modelVersion: '1'
        capacity: 120
      }
    ]
  }
  {
    id: 'francecentral'
    location: 'francecentral'
    priority: 2
    weight: 1
    // Global standard: processed in any Azure region, billed per token; capacity in thousands of tokens per minute.
    sku: 'GlobalStandard'
    deployments: [
      {
        name: 'gpt-4o'
        model: 'gpt-4o'
        modelVersion: '2024-11-20'
        capacity: 150
      }
      {
        name: 'gpt-4o-mini'
        model: 'gpt-4o-mini'
        modelVersion: '2024-07-18'
        capacity: 150
      }
      {
        name: 'text-embedding-3-small'
        model: 'text-embedding-3-small'
        modelVersion: '1'
        capacity: 120
      }
    ]
  }
]

param limitFailMode = 'open'
param maximumInstanceCount = 40
param alwaysReadyInstances = 1
param enablePrivateNetworking = false
